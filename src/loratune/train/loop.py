"""The training loop, written out in full: no framework owns it; accelerate only scales and clips.

One optimizer step consumes a *window* of `grad_accum` index lists of `batch_size` samples each (the
effective batch: batch_size x grad_accum samples). `Batching` turns the window into the micro-batches the
model sees: one padded micro-batch per list, or the window's samples laid end to end in padding-free
streams of at most `tokens_per_batch` tokens (fewer micro-batches when samples are short). The window's
batches are made first, so the number of supervised tokens in the whole window is known before any
backward pass: each micro-batch's summed loss is divided by that total, which makes the gradient
identical whatever the split between batch size, accumulation and layout.

The loop is given a runner (`loratune.train.runner`: loratune's decoder or the transformers model), which
computes one micro-batch's summed loss; it never looks inside the model. It is also given an objective
(`loratune.pref.objective`): what a micro-batch's loss is and how many units it counts, the normaliser above.
SFT (the default) is the runner's token loss over supervised tokens; a preference method (DPO, ORPO, SimPO,
KTO, a reward model) sums per-pair (per-completion) losses and counts pairs, so the same arithmetic holds for it. The
objective's metrics (rewards, margins, accuracy, log-probabilities) are averaged over the step into
`StepResult.extra`, and over the evaluation samples into `Loop.eval_stats`.

accelerate's `Accelerator` provides the device, the autocast context of the transformers runner (bf16, or
fp16 with its loss scaler; loratune's decoder computes in its own dtype), `backward` (which scales under fp16), `clip_grad_norm_` (which unscales first) and the
wrapped optimizer's `step` (which skips and backs the scale off on an fp16 overflow). The trainable
weights stay fp32: autocast only lowers the precision of the matmuls.

Several processes (`loratune.train.distributed`, launched by torchrun or accelerate launch): a window holds
`grad_accum x world` index lists, each rank trains on its share, the normaliser is the whole window's count
(all-reduced before any backward) and the gradients are summed over the ranks after the window, so a step
is the step of one process with `grad_accum x world` lists.

The data order of every epoch is a pure function of (seed, epoch), and a window's micro-batches a pure
function of the window, so the position in training is fully described by `LoopState` (step, epoch,
index list): that is what a checkpoint stores to resume.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from accelerate import Accelerator

from loratune.config import TrainConfig
from loratune.data.collate import Batching, batch_order
from loratune.data.pipeline import Sample
from loratune.errors import LoratuneError
from loratune.pref.objective import SFT, Objective
from loratune.train.distributed import World
from loratune.train.dropout_seeds import DropoutSeeds, draws_random
from loratune.train.faults import fault
from loratune.train.optim import build_scheduler
from loratune.train.runner import Runner

log = logging.getLogger("loratune.train")


class TrainingError(LoratuneError):
    """Training cannot go on (e.g. the loss keeps being NaN)."""


@dataclass
class LoopState:
    """Where training stands; with the optimizer, scheduler and RNG states, enough to continue exactly."""

    step: int = 0  # optimizer steps done
    epoch: int = 0  # current epoch
    micro: int = 0  # index lists of the current epoch already consumed (batch_order's padded micro-batches)
    tokens: int = 0  # supervised tokens trained on
    nonfinite_in_row: int = 0
    skipped_steps: int = 0
    last_eval_step: int = -1
    best_eval: float | None = None  # lowest eval loss so far
    best_step: int = -1
    evals_without_improvement: int = 0
    stopped_early: bool = False
    first_loss: float | None = None  # the reported train loss (metrics.Window) at the first logged step
    first_loss_steps: list[int] = field(default_factory=list)  # [first, last] step of the window it covers
    last_loss: float | None = None  # the reported train loss at the latest step
    last_eval: float | None = None  # the latest eval loss
    seconds: float = 0.0  # time spent training, summed over resumed sessions
    window: list[list[float]] = field(default_factory=list)  # metrics.Window's entries: the last log_every steps


@dataclass
class StepResult:
    loss: float  # mean per supervised token over the step's micro-batches (nan if skipped)
    loss_sum: float  # summed token losses of the step (nan if skipped): what metrics.Window adds up
    tokens: int  # supervised tokens in the step
    input_tokens: int  # non-padding tokens processed
    grad_norm: float
    lr: float
    skipped: bool
    seconds: float
    extra: dict = field(default_factory=dict)


def steps_per_epoch(n_micro: int, grad_accum: int) -> int:
    """Windows never span epochs: the last window of an epoch may be shorter (token-normalised anyway)."""
    return math.ceil(n_micro / grad_accum)


def total_steps(cfg: TrainConfig, per_epoch: int) -> int:
    """Optimizer steps the run is planned for: train.max_steps, else train.epochs x `per_epoch` steps."""
    if cfg.max_steps > 0:
        return cfg.max_steps
    return max(1, math.ceil(cfg.epochs * per_epoch))


class Loop:
    """Runs optimizer steps over `samples` from a `LoopState`; saving and logging are the caller's."""

    def __init__(self, runner: Runner, samples: list[Sample], cfg: TrainConfig, optimizer: torch.optim.Optimizer,
                 accelerator: Accelerator, batching: Batching, group_by_length: bool = False,
                 objective: Objective | None = None, world: World | None = None) -> None:
        self.runner, self.samples, self.cfg, self.batching = runner, samples, cfg, batching
        # several processes (loratune.train.distributed): a window holds every rank's index lists, each rank
        # trains on its share, so a step is the step of one process with grad_accum x world lists
        self.world = world or World()
        self.accum = cfg.grad_accum * self.world.size
        self.objective = objective or SFT()
        self.stats: dict[str, float] = {}  # the objective's metrics of the latest step
        self.eval_stats: dict[str, float] = {}  # ... of the latest evaluation
        self.optimizer, self.acc, self.group_by_length = optimizer, accelerator, group_by_length
        self.graphs = runner.graphs  # CUDA graph replay of repeated micro-batch shapes (loratune.kernels.graphs)
        self.n_micro = len(self.order(0))
        self.steps_per_epoch = steps_per_epoch(self.n_micro, self.accum)
        self.total = total_steps(cfg, self.steps_per_epoch)
        self.scheduler = build_scheduler(optimizer, cfg, self.total)
        # dropout masks drawn as a function of (seed, step, micro-batch, rank): reseeded before each micro-batch
        self.seeds = (DropoutSeeds(cfg.seed, accelerator.device, self.world.rank, self.world.size)
                      if draws_random(runner.module) else None)

    @property
    def params(self) -> list[torch.nn.Parameter]:
        """The parameters training now: read at each use, as train.optimizer badam switches them by steps."""
        return [p for p in self.runner.module.parameters() if p.requires_grad]

    # ------------------------------------------------------------------------------------------ data

    def order(self, epoch: int) -> list[list[int]]:
        return batch_order(self.samples, self.batching.batch_size, self.cfg.seed, epoch, self.group_by_length)

    def windows(self, state: LoopState) -> Iterator[tuple[int, int, list[list[int]]]]:
        """(epoch, index list after the window, index lists) for each remaining step from `state`."""
        epoch, micro = state.epoch, state.micro
        order = self.order(epoch)
        for _ in range(state.step, self.total):
            if micro >= len(order):
                epoch, micro = epoch + 1, 0
                order = self.order(epoch)
            window = order[micro:micro + self.accum]
            micro += len(window)
            yield epoch, micro, window

    def batches(self, window: list[list[int]]) -> list[dict[str, torch.Tensor]]:
        """The micro-batches of the step whose samples `window` lists."""
        return self.batching.micro_batches(self.samples, window)

    def input_tokens(self, window: list[list[int]]) -> int:
        """Real tokens (padding excluded) the window feeds the model: the numerator of tokens/s.

        Counted from the samples, not from the batch tensors: a packed or padding-free batch has no attention
        mask, and its padding (a segment of positions restarting at 0) looks like one more sample.
        """
        return sum(len(self.samples[i].input_ids) for idx in window for i in idx)

    # ------------------------------------------------------------------------------------------ step

    def forward_backward(self, batches: list[dict[str, torch.Tensor]], step: int = 0) -> tuple[float, int]:
        """Accumulate the window's gradients; returns (summed loss, supervised tokens); nan loss if non-finite.
        `step`: the optimizer steps done before this one (with micro-batch index: what the dropout masks are
        drawn from, `loratune.train.dropout_seeds`).

        The host never waits for the GPU inside the window: batches go over from pinned memory without
        blocking, the rows the loss keeps are counted on the host, and the losses are summed on the device
        and read once at the end. A non-finite micro-batch therefore makes the whole window's loss
        non-finite and the step is skipped (its gradients are dropped with it).
        """
        # every rank's count: the normaliser is the whole window's (one all-reduce, before any backward)
        n_window = self.world.sum_count(sum(self.objective.units(b) for b in batches), self.acc.device)
        self.stats = {}
        if n_window == 0:
            return float("nan"), 0
        total = torch.zeros((), dtype=torch.float64, device=self.acc.device)
        stats: dict[str, list] = {}
        passes = self.world.passes(len(batches), self.acc.device)  # sharded (FSDP): as many as the busiest rank
        for i, b in enumerate(batches):
            if self.seeds is not None:
                self.seeds.before(step, i)
            replayed = self.graphs.run(b, 1.0 / n_window) if self.graphs is not None else None
            if replayed is not None:  # forward and backward done by one graph replay
                total += replayed
                continue
            timed = self.graphs is not None and self.graphs.timing  # the graphs compare their replay with this
            if timed:
                torch.cuda.synchronize()
                t0 = time.perf_counter()
            with self.runner.accumulating(last=i == passes - 1):
                loss_sum, metrics = self.objective.loss_sum(self.runner, b)
                _add_stats(stats, metrics)
                if fault("loss"):
                    loss_sum = loss_sum + float("inf")
                self.acc.backward(loss_sum / n_window)
            if timed:
                torch.cuda.synchronize()
                self.graphs.eager_took(time.perf_counter() - t0)
            fault("step.backward")
            total += loss_sum.detach()
            del loss_sum  # drop this micro-batch's autograd graph now: a CUDA graph capture must not meet it
        for i in range(len(batches), passes):  # sharded: this rank's share ran out; it joins the others' passes
            with self.runner.accumulating(last=i == passes - 1):
                self.runner.idle_pass()
        self.world.sum_grads(self.params)  # several processes: every rank's gradients summed, in place
        value = float(self.world.sum_loss(total))  # non-finite on any rank: skipped on all
        if not isinstance(self.objective, SFT):  # a preference objective's metrics: over every rank's share
            stats = self.world.sum_stats(stats)
        self.stats = _mean_stats(stats)
        return (value if math.isfinite(value) else float("nan")), n_window

    def step(self, state: LoopState, window: list[list[int]]) -> StepResult:
        """One optimizer step over the window; skipped (no update) if the loss or a gradient is non-finite."""
        t0 = time.perf_counter()
        self.runner.module.train()
        batches = self.batches(self.world.share(window))
        n_input = self.input_tokens(window)  # the whole window's, every rank's share
        with self.runner.frozen_adapters():  # no adapter weight changes until optimizer.step below
            loss_sum, n_window = self.forward_backward(batches, state.step)
        lr = self.optimizer.param_groups[0]["lr"]  # the rate this step uses (set by the schedule's last step)
        finite, grad_norm, overflow = math.isfinite(loss_sum), float("nan"), False
        if finite:
            clip = self.cfg.max_grad_norm if self.cfg.max_grad_norm > 0 else float("inf")
            grad_norm = float(self.acc.clip_grad_norm_(self.params, clip))  # unscales fp16 gradients first
            scaler = self.acc.scaler
            if scaler is not None:  # the scaler skips an overflowing step itself and lowers its scale
                self.optimizer.step()
                overflow = bool(self.optimizer.step_was_skipped)
                finite = not overflow
            elif math.isfinite(grad_norm):
                self.optimizer.step()
            else:
                finite = False
        if self.graphs is None or not self.graphs.zero_grads():  # graphs: zeroed in place, still attached
            self.optimizer.zero_grad(set_to_none=True)
        if finite:  # a skipped step is no step for the schedule either (as accelerate's scheduler wrapper does)
            self.scheduler.step()
        state.step += 1
        self._account(state, finite, overflow)
        if finite:
            state.tokens += n_window
            self._check_weights(state)
        fault("step.end")
        mean = loss_sum / n_window if finite else float("nan")
        return StepResult(mean, loss_sum if finite else float("nan"), n_window, n_input, grad_norm, lr, not finite,
                          time.perf_counter() - t0, dict(self.stats) if finite else {})

    def _account(self, state: LoopState, finite: bool, overflow: bool) -> None:
        """Count skipped steps; too many non-finite ones in a row end the run with advice."""
        if finite:
            state.nonfinite_in_row = 0
            return
        state.skipped_steps += 1
        scale = self.acc.scaler.get_scale() if self.acc.scaler is not None else 0.0
        if overflow and scale >= 1.0:  # an fp16 overflow the scaler handles by lowering its scale
            log.info("step %d: fp16 gradient overflow, step skipped; loss scale now %g", state.step, scale)
            return
        state.nonfinite_in_row += 1
        log.warning("step %d: non-finite loss or gradient, step skipped (%d in a row)", state.step,
                    state.nonfinite_in_row)
        if state.nonfinite_in_row >= self.cfg.max_nonfinite:
            raise TrainingError(
                f"{state.nonfinite_in_row} steps in a row had a NaN/inf loss or gradient (last at step {state.step}); "
                "nothing from these steps was applied or saved. Try quantization.compute_dtype=bf16 instead of fp16, "
                "a lower train.lr, or gradient clipping (train.max_grad_norm=0.3)")

    def _check_weights(self, state: LoopState) -> None:
        """An update from finite gradients can still overflow a weight; such weights must never be saved."""
        if not bool(torch.stack([torch.isfinite(p).all() for p in self.params]).all()):
            raise TrainingError(
                f"the trainable weights became NaN/inf in the update of step {state.step}; they were not saved. "
                "Resume from the last checkpoint with a lower train.lr or train.max_grad_norm")

    # ------------------------------------------------------------------------------------------ eval

    def evaluate(self, samples: list[Sample]) -> float:
        """Mean loss per unit (supervised token for SFT) over `samples` (no gradient, no dropout), in fixed order;
        the objective's metrics go to `eval_stats`."""
        module = self.runner.module
        module.eval()
        total, n = 0.0, 0
        stats: dict[str, list] = {}
        world = self.world  # several processes: each evaluates every world-th batch, the sums are all-reduced
        mine = [b for i, b in enumerate(self.batching.eval_batches(samples)) if i % world.size == world.rank]
        passes = world.passes(len(mine), self.acc.device)  # sharded: as many passes as rank 0 (before any pass)
        with torch.no_grad(), self.runner.frozen_adapters():
            for b in mine:
                k = self.objective.units(b)
                s, metrics = self.objective.loss_sum(self.runner, b)
                _add_stats(stats, metrics)
                total, n = total + float(s), n + k
            for _ in range(len(mine), passes):  # sharded: this rank's share ran out; it joins the others' passes
                self.runner.idle_pass()
        module.train()
        if world.active:
            total = float(world.sum_loss(torch.tensor(total, dtype=torch.float64, device=self.acc.device)))
            n = world.sum_count(n, self.acc.device)
            stats = world.sum_stats(stats) if not isinstance(self.objective, SFT) else stats
        self.eval_stats = _mean_stats(stats)
        return total / n if n else float("nan")


def _add_stats(into: dict[str, list], metrics: dict) -> None:
    """Add a micro-batch's {name: (sum, count)} to the running sums (kept on the device until `_mean_stats`)."""
    for name, (value, count) in metrics.items():
        entry = into.setdefault(name, [0.0, 0.0])
        entry[0] = entry[0] + (value.detach() if isinstance(value, torch.Tensor) else value)
        entry[1] += count


def _mean_stats(stats: dict[str, list]) -> dict[str, float]:
    return {name: float(total) / count for name, (total, count) in stats.items() if count > 0}
