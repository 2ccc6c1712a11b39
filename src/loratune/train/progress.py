"""What the user sees while training: a rich progress bar in a terminal, plain log lines otherwise."""

from __future__ import annotations

import logging
import resource
import sys
import time

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

log = logging.getLogger("loratune.train")


def memory_gib(device: torch.device) -> float:
    """Peak allocated accelerator memory in GiB; on CPU the process's peak resident memory."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


class Throughput:
    """Tokens per second of training (evaluation and saving excluded) since the last `take()`."""

    def __init__(self) -> None:
        self.seconds, self.tokens = 0.0, 0

    def add(self, tokens: int, seconds: float) -> None:
        self.tokens += tokens
        self.seconds += seconds

    def take(self) -> float:
        rate = self.tokens / max(self.seconds, 1e-9)
        self.seconds, self.tokens = 0.0, 0
        return rate


class Reporter:
    """Progress bar (terminal) or log lines (anything else), from `start_step` to `total_steps`."""

    def __init__(self, total_steps: int, start_step: int = 0) -> None:
        self.total = total_steps
        self.console = Console(stderr=True)
        self.tty = self.console.is_terminal
        # the fields take about 70 columns; the bar gets what is left, so that nothing is cut off at 80
        bar = max(8, min(30, self.console.width - 72))
        self.progress = Progress(
            BarColumn(bar_width=bar), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
            TextColumn("eta"), TimeRemainingColumn(), console=self.console, disable=not self.tty, transient=False,
        )
        self.task = self.progress.add_task("train", total=total_steps, completed=start_step, info="")
        self.start_step, self.t0 = start_step, time.perf_counter()

    def __enter__(self) -> Reporter:
        self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.stop()

    def step(self, step: int, epoch: float, loss: float, lr: float, tokens_per_s: float, mem_gib: float,
             log_line: bool) -> None:
        info = f"ep {epoch:.2f} loss {loss:.4f} lr {lr:.1e} {tokens_per_s:,.0f} tok/s {mem_gib:.1f}GiB"
        self.progress.update(self.task, completed=step, info=info)
        if log_line and not self.tty:
            log.info("step %d/%d  %s  eta %s", step, self.total, info, self.eta(step))

    def eta(self, step: int) -> str:
        """Time left at the mean pace of this session's steps so far (m:ss, or h:mm:ss)."""
        done = step - self.start_step
        if done <= 0:
            return "?"
        left = round((self.total - step) * (time.perf_counter() - self.t0) / done)
        h, rest = divmod(left, 3600)
        return f"{h}:{rest // 60:02d}:{rest % 60:02d}" if h else f"{rest // 60}:{rest % 60:02d}"

    def print(self, text: str) -> None:
        if self.tty:
            self.progress.console.print(text, highlight=False, markup=False)
        else:
            print(text, file=sys.stderr, flush=True)
