"""What the user sees while training: a rich progress bar in a terminal, plain log lines otherwise,
and `metrics.jsonl` (one JSON line per logged step) in the output folder either way."""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

log = logging.getLogger("loratune.train")


def memory_gib(device: torch.device) -> float:
    """Peak allocated accelerator memory in GiB (0 on CPU, where it is not tracked)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return 0.0


class Reporter:
    def __init__(self, total_steps: int, out_dir: Path, log_every: int, device: torch.device,
                 start_step: int = 0) -> None:
        self.total, self.log_every, self.device = total_steps, log_every, device
        self.metrics_path = out_dir / "metrics.jsonl"
        self.console = Console(stderr=True)
        self.tty = self.console.is_terminal
        self.t0 = time.perf_counter()
        self.tokens = 0
        self.progress = Progress(
            TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
            TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(), console=self.console,
            disable=not self.tty, transient=False,
        )
        self.task = self.progress.add_task("train", total=total_steps, completed=start_step, info="")

    def __enter__(self) -> Reporter:
        self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.stop()

    def step(self, step: int, epoch: float, loss: float, lr: float, grad_norm: float, tokens: int,
             extra: dict | None = None) -> None:
        self.tokens += tokens
        elapsed = time.perf_counter() - self.t0
        tps = self.tokens / elapsed if elapsed > 0 else 0.0
        mem = memory_gib(self.device)
        info = f"loss {loss:.4f}  lr {lr:.2e}  {tps:,.0f} tok/s" + (f"  {mem:.1f} GiB" if mem else "")
        self.progress.update(self.task, completed=step, info=info)
        if step % self.log_every == 0 or step == self.total:
            row = {"step": step, "epoch": round(epoch, 4), "loss": loss, "lr": lr, "grad_norm": grad_norm,
                   "tokens_per_s": round(tps, 1), "memory_gib": round(mem, 3), **(extra or {})}
            with self.metrics_path.open("a", encoding="utf-8") as f:
                f.write(json.dumps(row) + "\n")
            if not self.tty:
                log.info("step %d/%d  epoch %.2f  %s", step, self.total, epoch, info)

    def print(self, text: str) -> None:
        (self.progress.console.print if self.tty else (lambda t: print(t, file=sys.stderr)))(text)
