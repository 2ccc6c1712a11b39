"""The training loop, written out in full: no framework owns it.

One optimizer step consumes a *window* of `grad_accum` micro-batches. The window's batches are fetched
first, so the number of supervised tokens in the whole window is known before any backward pass: each
micro-batch's summed loss is divided by that total, which makes the gradient identical whatever the
split between batch size and accumulation.

The data order of every epoch is a pure function of (seed, epoch), so the position in training is fully
described by `LoopState` (step, epoch, micro-batch index): that is what a checkpoint stores to resume.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from torch import nn

from loratune.config import TrainConfig
from loratune.data.collate import batch_order, collate
from loratune.data.pipeline import Sample
from loratune.errors import LoratuneError
from loratune.train.loss import lm_loss_sum
from loratune.train.optim import build_scheduler

log = logging.getLogger(__name__)


class TrainingError(LoratuneError):
    """Training cannot go on (e.g. the loss keeps being NaN)."""


@dataclass
class LoopState:
    """Where training stands; enough, with the RNG states, to continue exactly."""

    step: int = 0  # optimizer steps done
    epoch: int = 0  # current epoch
    micro: int = 0  # micro-batches of the current epoch already consumed
    tokens: int = 0  # supervised tokens trained on
    nonfinite_in_row: int = 0
    skipped_steps: int = 0


@dataclass
class StepResult:
    loss: float
    tokens: int
    grad_norm: float
    lr: float
    skipped: bool
    seconds: float
    extra: dict = field(default_factory=dict)


def steps_per_epoch(n_micro: int, grad_accum: int) -> int:
    """Windows never span epochs: the last window of an epoch may be shorter (token-normalised anyway)."""
    return math.ceil(n_micro / grad_accum)


def total_steps(cfg: TrainConfig, n_micro: int) -> int:
    if cfg.max_steps > 0:
        return cfg.max_steps
    return max(1, math.ceil(cfg.epochs * steps_per_epoch(n_micro, cfg.grad_accum)))


class Loop:
    """Runs optimizer steps over `samples` from a `LoopState`; saving and logging are the caller's hooks."""

    def __init__(self, model: nn.Module, samples: list[Sample], cfg: TrainConfig, optimizer: torch.optim.Optimizer,
                 pad_id: int, device: torch.device,
                 autocast_dtype: torch.dtype | None = None, scaler: torch.amp.GradScaler | None = None,
                 loss_fn: Callable = lm_loss_sum) -> None:
        self.model, self.samples, self.cfg = model, samples, cfg
        self.optimizer, self.scaler = optimizer, scaler
        self.pad_id, self.device, self.autocast_dtype, self.loss_fn = pad_id, device, autocast_dtype, loss_fn
        self.group_by_length = False
        self.n_micro = len(self.order(0))
        self.total = total_steps(cfg, self.n_micro)
        self.scheduler = build_scheduler(optimizer, cfg, self.total)
        self.params = [p for p in model.parameters() if p.requires_grad]

    def order(self, epoch: int) -> list[list[int]]:
        return batch_order(self.samples, self.cfg.batch_size, self.cfg.seed, epoch, self.group_by_length)

    def windows(self, state: LoopState) -> Iterator[tuple[int, int, list[list[int]]]]:
        """(epoch, next micro index, micro-batches) for each remaining step, starting at `state`."""
        epoch, micro = state.epoch, state.micro
        for _ in range(state.step, self.total):
            order = self.order(epoch)
            if micro >= len(order):
                epoch, micro = epoch + 1, 0
                order = self.order(epoch)
            window = order[micro:micro + self.cfg.grad_accum]
            micro += len(window)
            yield epoch, micro, window

    def _autocast(self) -> torch.autocast:
        """Mixed precision for the forward pass; the trainable weights themselves stay fp32."""
        if self.autocast_dtype is None:
            return torch.autocast(self.device.type, enabled=False)
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def _forward_backward(self, batch: dict[str, torch.Tensor], n_window: int) -> float:
        with self._autocast():
            loss_sum, _ = self.loss_fn(self.model, batch)
        loss = loss_sum / n_window
        if not torch.isfinite(loss):
            return float("nan")
        (self.scaler.scale(loss) if self.scaler else loss).backward()
        return float(loss_sum.detach())

    def step(self, state: LoopState, window: list[list[int]]) -> StepResult:
        """One optimizer step over the window; skips it (no update) if anything is non-finite."""
        t0 = time.perf_counter()
        self.model.train()
        batches = [collate([self.samples[i] for i in idx], self.pad_id) for idx in window]
        n_window = sum(int((b["labels"][:, 1:] != -100).sum()) for b in batches)
        loss_total, finite = 0.0, n_window > 0
        for b in batches:
            if not finite:
                break
            b = {k: v.to(self.device) for k, v in b.items()}
            s = self._forward_backward(b, max(n_window, 1))
            finite = math.isfinite(s)
            loss_total += s
        grad_norm = float("nan")
        if finite:
            if self.scaler:
                self.scaler.unscale_(self.optimizer)
            clip = self.cfg.max_grad_norm if self.cfg.max_grad_norm > 0 else float("inf")
            grad_norm = float(torch.nn.utils.clip_grad_norm_(self.params, clip))
            finite = math.isfinite(grad_norm)
        lr = self.scheduler.get_last_lr()[0]
        if finite:
            if self.scaler:
                self.scaler.step(self.optimizer)
                self.scaler.update()
            else:
                self.optimizer.step()
            state.nonfinite_in_row = 0
        else:
            state.nonfinite_in_row += 1
            state.skipped_steps += 1
            log.warning("step %d: non-finite loss or gradient, step skipped (%d in a row)",
                        state.step + 1, state.nonfinite_in_row)
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        state.step += 1
        state.tokens += n_window if finite else 0
        if state.nonfinite_in_row >= self.cfg.max_nonfinite:
            raise TrainingError(
                f"{state.nonfinite_in_row} steps in a row had a NaN/inf loss or gradient (last at step {state.step}); "
                "try quantization.compute_dtype=bf16 instead of fp16, a lower train.lr, or train.max_grad_norm=0.3")
        mean = loss_total / n_window if finite and n_window else float("nan")
        return StepResult(mean, n_window, grad_norm, lr, not finite, time.perf_counter() - t0)

    def evaluate(self, samples: list[Sample]) -> float:
        """Mean token loss over `samples` (no gradient), in fixed order."""
        self.model.eval()
        total, n = 0.0, 0
        with torch.no_grad():
            for i in range(0, len(samples), self.cfg.batch_size):
                b = collate(samples[i:i + self.cfg.batch_size], self.pad_id)
                b = {k: v.to(self.device) for k, v in b.items()}
                with self._autocast():
                    s, k = self.loss_fn(self.model, b)
                total, n = total + float(s), n + k
        self.model.train()
        return total / max(n, 1)
