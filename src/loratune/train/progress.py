"""What the user sees while training: a rich progress bar in a terminal, plain log lines otherwise.

The figures shown are the run's reported ones (`loratune.train.metrics.Window`): the train loss and the
tokens/s over the last `train.log_every` steps, so a log line says exactly what the metrics row of the
same step says. The time left is the mean wall-clock pace of this session's steps so far (evaluations
and checkpoints included, since they recur) times the steps left.
"""

from __future__ import annotations

import logging
import resource
import sys
import time
from collections.abc import Callable

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

log = logging.getLogger("loratune.train")


def memory_gib(device: torch.device) -> float:
    """Peak allocated accelerator memory in GiB; on CPU the process's peak resident memory."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


class Reporter:
    """Progress bar (terminal) or log lines (anything else), from `start_step` to `total_steps`."""

    def __init__(self, total_steps: int, start_step: int = 0, clock: Callable[[], float] = time.perf_counter) -> None:
        self.total, self.clock = total_steps, clock
        self.console = Console(stderr=True)
        self.tty = self.console.is_terminal
        # the fields take about 70 columns; the bar gets what is left, so that nothing is cut off at 80
        bar = max(8, min(30, self.console.width - 72))
        self.progress = Progress(
            BarColumn(bar_width=bar), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
            TextColumn("eta"), TimeRemainingColumn(), console=self.console, disable=not self.tty, transient=False,
        )
        self.task = self.progress.add_task("train", total=total_steps, completed=start_step, info="")
        self.start_step, self.t0 = start_step, clock()

    def __enter__(self) -> Reporter:
        self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.stop()

    def step(self, step: int, epoch: float, loss: float | None, lr: float, tokens_per_s: float, mem_gib: float,
             log_line: bool, extra: str = "") -> None:
        """Show step `step`; `loss` and `tokens_per_s` are the window's (None: no finite loss in it yet); `extra`:
        the objective's figures after the loss (preference methods: accuracy and margin)."""
        shown = f"{loss:.4f}" if loss is not None else "-"
        info = f"ep {epoch:.2f} loss {shown}{extra} lr {lr:.1e} {tokens_per_s:,.0f} tok/s {mem_gib:.1f}GiB"
        self.progress.update(self.task, completed=step, info=info)
        if log_line and not self.tty:
            log.info("step %d/%d  %s  eta %s", step, self.total, info, self.eta(step))

    def eta(self, step: int) -> str:
        """Time left after `step`: this session's mean seconds per step so far x the steps left."""
        left = time_left(step - self.start_step, self.clock() - self.t0, self.total - step)
        return "?" if left is None else clock_text(left)

    def print(self, text: str) -> None:
        if self.tty:
            self.progress.console.print(text, highlight=False, markup=False)
        else:
            print(text, file=sys.stderr, flush=True)


def time_left(steps_done: int, seconds: float, steps_left: int) -> float | None:
    """Seconds left at the mean pace of `steps_done` steps in `seconds`; None before any step is done."""
    if steps_done <= 0:
        return None
    return max(0, steps_left) * seconds / steps_done


def clock_text(seconds: float) -> str:
    """m:ss, or h:mm:ss from an hour on (rounded to the second)."""
    total = round(seconds)
    h, rest = divmod(total, 3600)
    return f"{h}:{rest // 60:02d}:{rest % 60:02d}" if h else f"{rest // 60}:{rest % 60:02d}"
