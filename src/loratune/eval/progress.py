"""Progress of an eval: a bar per (model, task) on a terminal, a log line every few percent otherwise.

Items found in the resumable cache count as done from the start, so a continued eval shows where it
stands rather than starting at zero.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

log = logging.getLogger("loratune.eval")


class Bar:
    """Counts finished items of one job; `advance(n)` after each batch."""

    def __init__(self, label: str, total: int, done: int, progress: Progress | None) -> None:
        self.label, self.total, self.done = label, total, done
        self.progress = progress
        self.task = progress.add_task(label, total=total, completed=done) if progress else None
        self.logged, self.last_log = done, time.monotonic()
        if done == total:
            log.info("%s: all %d items in the cache", label, total)
        elif done:
            log.info("%s: %d of %d items in the cache, continuing", label, done, total)

    def advance(self, n: int) -> None:
        self.done += n
        if self.progress is not None:
            self.progress.update(self.task, completed=self.done)
            return
        step = max(1, self.total // 10)
        if self.done - self.logged >= step or self.done == self.total or time.monotonic() - self.last_log > 30:
            log.info("%s: %d/%d", self.label, self.done, self.total)
            self.logged, self.last_log = self.done, time.monotonic()


@contextmanager
def bar(label: str, total: int, done: int = 0) -> Iterator[Bar]:
    """A progress bar on a terminal (stderr), log lines otherwise."""
    console = Console(stderr=True)
    if not console.is_terminal or total == 0:
        yield Bar(label, total, done, None)
        return
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                  console=console, transient=False) as progress:
        yield Bar(label, total, done, progress)
