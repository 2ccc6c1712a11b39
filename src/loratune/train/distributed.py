"""Data-parallel training over several processes: who this process is, its share of a step, and the few
collectives the loop needs, all through torch.distributed's process group (which accelerate's `Accelerator`
sets up from the launcher's environment: `torchrun`, `accelerate launch`). No communication code of our own.

Exactness with one process is the design rule. A step's window is `grad_accum x world` index lists of
`batch_size` samples, in the order one process with `grad_accum x world` would take them; rank r trains on
lists r, r + world, ... (`World.share`). The window's supervised-token count is all-reduced once before any
backward, so each rank divides its summed loss by the GLOBAL count; after the window's backward passes the
trainable parameters' gradients are all-reduced (summed) in one flat buffer (`World.sum_grads`), giving
every rank exactly the one-process gradient (up to the order of float additions). The summed loss is
all-reduced too: a non-finite loss on any rank makes it non-finite on all, so all ranks skip together; the
clipped update is then the same on every rank and the adapters stay identical without a broadcast.

Gradients are summed by hand rather than by wrapping the model in DistributedDataParallel: loratune's
decoder is called through its own methods (not `forward`), which DDP's hooks would not see, and a rank
whose share of a short last window is empty must still join the reduction, which DDP cannot do without a
dummy backward. The runner contract (`Runner.accumulating`) is unchanged.

Rank 0 alone writes (progress, metrics.jsonl, checkpoints, the output folder); the others wait at a
barrier. Each rank's RNG state goes into the checkpoint (`rng_file`), so resume is exact on every rank.
"""

from __future__ import annotations

import logging
import os
import signal
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import torch
import torch.distributed as dist

from loratune.errors import ConfigError

ENV_RANK, ENV_WORLD = "RANK", "WORLD_SIZE"  # set by torchrun and accelerate launch
T = TypeVar("T")


@dataclass(frozen=True)
class World:
    """This process's place among the processes training together; World() is one process alone."""

    rank: int = 0
    size: int = 1
    sharded: bool = False  # train.strategy fsdp: FSDP reduces the gradients, every rank runs the same passes

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def several(self) -> bool:
        return self.size > 1

    @property
    def active(self) -> bool:
        """Collectives run: several processes, or a process group of one (the multi-process path's own test)."""
        return self.several or (dist.is_available() and dist.is_initialized())

    def share(self, window: list[list[int]]) -> list[list[int]]:
        """This rank's index lists of a step's window (strided, so a short last window loads the ranks evenly)."""
        return window[self.rank::self.size]

    def sum_count(self, n: int, device: torch.device) -> int:
        """The sum of an integer over all ranks (the window's supervised tokens or pairs)."""
        if not self.active:
            return n
        t = torch.tensor([n], dtype=torch.int64, device=device)
        dist.all_reduce(t)
        return int(t.item())

    def sum_loss(self, total: torch.Tensor) -> torch.Tensor:
        """The window's summed loss over all ranks (non-finite anywhere -> non-finite everywhere)."""
        if self.active:
            dist.all_reduce(total)
        return total

    def sum_grads(self, params: list[torch.nn.Parameter]) -> None:
        """Sum the gradients of `params` over all ranks, in place, in one all-reduce of a flat buffer.

        A parameter without a gradient on this rank (its share of the window was empty) contributes zeros and
        receives the sum, so every rank leaves with the same gradients."""
        if not self.active or not params or self.sharded:  # FSDP reduce-scattered them already
            return
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        offset = 0
        for p, g in zip(params, grads):
            n = g.numel()
            summed = flat[offset:offset + n].view_as(g)
            if p.grad is None:
                p.grad = summed.clone()
            else:
                p.grad.copy_(summed)
            offset += n

    def passes(self, n: int, device: torch.device) -> int:
        """How many passes this rank runs for its `n` micro-batches: `n`, or sharded, the most any rank has
        (each FSDP pass is a collective: a rank with fewer runs idle passes, `loratune.train.fsdp`)."""
        return self.max_int(n, device) if self.sharded and self.active else n

    def max_int(self, n: int, device: torch.device) -> int:
        """The largest of an integer over all ranks (a stop request: the number of the signal that asked)."""
        if not self.active:
            return n
        t = torch.tensor([n], dtype=torch.int64, device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return int(t.item())

    def sum_stats(self, stats: dict[str, list]) -> dict[str, list]:
        """{name: [sum, count]} summed over the ranks (a rank may have none: its share of the window was empty)."""
        if not self.active:
            return stats
        merged: dict[str, list] = {}
        for part in self.gather({k: [float(v), float(n)] for k, (v, n) in stats.items()}):
            for k, (v, n) in part.items():
                entry = merged.setdefault(k, [0.0, 0.0])
                entry[0], entry[1] = entry[0] + v, entry[1] + n
        return merged

    def barrier(self) -> None:
        if self.active:
            dist.barrier()

    def gather(self, obj: object) -> list[object]:
        """Every rank's `obj`, in rank order, on every rank (small picklable objects: RNG states)."""
        if not self.active:
            return [obj]
        out: list[object] = [None] * self.size
        dist.all_gather_object(out, obj)
        return out


def world_from_env() -> World:
    """The world the launcher started (RANK / WORLD_SIZE), known before the process group exists."""
    try:
        rank, size = int(os.environ.get(ENV_RANK, "0")), int(os.environ.get(ENV_WORLD, "1"))
    except ValueError as e:
        raise ConfigError(f"the launcher's {ENV_RANK}/{ENV_WORLD} are not integers: {e}") from None
    if size < 1 or not 0 <= rank < size:
        raise ConfigError(f"the launcher's {ENV_RANK}={rank} is not in [0, {ENV_WORLD}={size})")
    return World(rank, size)


def bind_device(world: World) -> None:
    """Several processes on GPUs: this process's GPU (LOCAL_RANK) becomes the current one before anything touches
    CUDA, so the memory plan reads its own GPU's free memory and no rank opens a context on GPU 0."""
    local = os.environ.get("LOCAL_RANK")
    if world.several and local is not None and torch.cuda.is_available():
        torch.cuda.set_device(int(local))


def join(world: World, host_collectives: bool = False) -> None:
    """Several processes: join the launcher's process group now, through accelerate's shared state (the
    `Accelerator` made later reuses it), so the ranks can agree on where the run starts (`main_first`).
    `host_collectives` (fsdp with its shards in host memory): on GPUs the group gets gloo for host tensors beside
    NCCL (gradient clipping and the weight check reduce over host-side shards), as accelerate's own FSDP
    offload does."""
    if world.several:
        from accelerate import PartialState

        cpu = not torch.cuda.is_available()
        PartialState(cpu=cpu, **({"backend": "cuda:nccl,cpu:gloo"} if host_collectives and not cpu else {}))


def main_first(world: World, fn: Callable[[], T]) -> T:
    """`fn()` on rank 0 first (it may clear or change the output folder), then on the others, which find the
    folder as rank 0 left it and reach the same decision; rank 0's error is theirs too (they meet it again)."""
    if not world.active:
        return fn()
    if world.main:
        try:
            return fn()
        finally:
            world.barrier()
    world.barrier()
    return fn()


def check_world(devices: int | str, strategy: str, world: World) -> str:
    """The strategy this run uses for `world` (train.devices / train.strategy checked against the launch):
    single, ddp, fsdp, or auto (several processes; the run decides it from the memory plan)."""
    if devices != "auto" and devices != world.size:
        how = (f"launch {devices} processes: `torchrun --nproc-per-node {devices} -m loratune train CONFIG` "
               f"(or `accelerate launch --multi_gpu --num_processes {devices} -m loratune train CONFIG` on GPUs)")
        raise ConfigError(f"train.devices is {devices} but {world.size} process(es) were launched; {how}, or set "
                          "train.devices=auto")
    if strategy == "fsdp" and world.active:  # a process group of one shards too (the path's own GPU test)
        return "fsdp"
    if not world.several:
        if strategy == "fsdp":
            logging.getLogger("loratune.train").info(
                "train.strategy fsdp with one process and no launcher: nothing to shard, it trains as one process")
        return "single"
    return strategy  # ddp, fsdp, or auto: decided from the memory plan (`parallel_plan.choose_strategy`)


def rng_file(rank: int) -> str:
    """The checkpoint file holding rank `rank`'s RNG state (rank 0's is in the training state itself)."""
    return f"rng_rank{rank}.safetensors"


def save_rank_rngs(folder: Path, states: list[object]) -> None:
    """Write ranks 1.. RNG states (as `World.gather` collected them) into the checkpoint folder."""
    import json

    from safetensors.torch import save_file

    for rank, (tensors, meta) in enumerate(states):
        if rank:
            save_file(tensors, str(folder / rng_file(rank)), metadata={"rng": json.dumps(meta)})


def load_rank_rng(folder: Path, rank: int) -> tuple[dict[str, torch.Tensor], dict]:
    """Rank `rank`'s RNG state from a checkpoint; a clear error if the checkpoint was written by fewer ranks."""
    import json

    from safetensors import safe_open

    path = folder / rng_file(rank)
    if not path.is_file():
        raise ConfigError(f"the checkpoint {folder} holds no RNG state for rank {rank} ({path.name} is missing): it "
                          "was written by fewer processes; resume with the number of processes that wrote it")
    with safe_open(str(path), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        meta = json.loads(f.metadata()["rng"])
    return tensors, meta


def saved_world(folder: Path) -> int:
    """How many processes wrote the checkpoint in `folder` (one RNG file for each rank past 0)."""
    return 1 + sum(1 for _ in folder.glob("rng_rank*.safetensors"))


def check_launch(processes: int, world: World) -> None:
    """The process group accelerate joined is the launcher's world."""
    if processes != world.size:
        raise ConfigError(f"accelerate sees {processes} process(es) but the launcher set {ENV_WORLD}={world.size}")


def check_checkpoint_world(world: World, checkpoint: Path | None, grad_accum: int,
                           saved_grad_accum: int | None) -> int:
    """How many processes wrote `checkpoint` (this world's size when there is none), checked before anything loads.

    Another number of processes resumes it when the global batch stays: a step's window is grad_accum x processes
    index lists of the epoch's order, and the checkpoint records how many lists were consumed, so with
    grad_accum x processes unchanged every later window holds the same samples, normalised by the same global
    token count. Otherwise the error says which train.grad_accum keeps it."""
    if checkpoint is None:
        return world.size
    saved = saved_world(checkpoint)
    if saved == world.size:
        return saved
    window = saved * (saved_grad_accum or grad_accum)
    if grad_accum * world.size == window:
        return saved
    fix = (f"set train.grad_accum={window // world.size} (the checkpoint's {saved_grad_accum} x {saved} processes)"
           if window % world.size == 0 else
           f"resume with a number of processes that divides {window} and set train.grad_accum to match")
    raise ConfigError(
        f"the checkpoint {checkpoint} was written by {saved} process(es), this run has {world.size}: a step's window "
        f"holds grad_accum x processes index lists ({saved_grad_accum} x {saved} = {window} there, {grad_accum} x "
        f"{world.size} = {grad_accum * world.size} here), so the data position would not carry over; {fix}, or "
        f"resume with {saved} process(es) (e.g. `torchrun --nproc-per-node {saved} -m loratune train CONFIG`)")


def restore_rank_rng(folder: Path, world: World, seed: int, step: int) -> bool:
    """This rank's own RNG state from the checkpoint (rank 0's is restored with the training state); a rank the
    checkpoint has none for (it was written by fewer processes) is seeded from (seed, rank, step). Returns
    whether the rank's saved state was there."""
    import random

    import numpy as np

    from loratune.train.trainer_state import load_rng_state

    if world.main:
        return True
    if (folder / rng_file(world.rank)).is_file():
        load_rng_state(*load_rank_rng(folder, world.rank))
        return True
    mixed = (seed * 1_000_003 + world.rank * 7_919 + step) % (2**32)
    random.seed(mixed)
    np.random.seed(mixed)
    torch.manual_seed(mixed)
    return False


class Quiet:
    """What ranks past 0 get instead of the progress reporter and the metrics log: nothing printed or written."""

    def __enter__(self) -> Quiet:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def step(self, *args: object, **kwargs: object) -> None:
        return None

    def print(self, text: str) -> None:
        return None

    def write(self, row: dict) -> None:
        return None

    def rows(self) -> list[dict]:
        return []

    def close(self) -> None:
        return None


def stop_code(signal_name: str | None) -> int:
    """A stop request as a number all ranks can compare: 0 none, the signal's number, or 1 for another request."""
    if signal_name is None:
        return 0
    known = {s.name: int(s) for s in (signal.SIGINT, signal.SIGTERM)}
    return known.get(signal_name, 1)


def stop_name(code: int) -> str:
    """The stop request `stop_code` numbered, as GracefulStop names it."""
    return signal.Signals(code).name if code in (int(signal.SIGINT), int(signal.SIGTERM)) else "stop request"
