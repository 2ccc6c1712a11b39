"""Dropout masks as a function of (seed, step, micro-batch, rank), not of how many random kernels ran before.

Why: adapter dropout draws its masks from the device's default generator (the one activation checkpointing
stashes and restores for its recompute, and the one a CUDA graph replays with). Left alone, a mask depends on
everything that consumed that generator earlier in the process: a CUDA graph's warm-up and timed replay, an
evaluation, a resumed run's shorter history. So before each micro-batch of a training step the loop reseeds
the default generator of the training device with `micro_batch_seed(seed, step, micro)`: an
uninterrupted run, a run resumed from any checkpoint, an eager micro-batch and its graph replay then draw the
same masks (a replay reads the generator's seed and offset at replay time and advances the offset by what
its kernels draw, as the eager pass does). With several processes `micro` counts across the ranks as their
shares of the window are dealt (rank r's i-th micro-batch is number r + i x world size): every rank draws its
own masks.

Only runs whose model draws random numbers in training are reseeded (`draws_random`: adapter dropout, an
`nn.Dropout`, the decoder's attention or residual dropout); the others never touch the generator.
"""

from __future__ import annotations

import torch
from torch import nn

_MASK = (1 << 64) - 1


def _mix(z: int) -> int:
    """splitmix64's finaliser: a bijection of 64-bit integers that spreads every input bit over the output."""
    z = (z + 0x9E3779B97F4A7C15) & _MASK
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK
    return z ^ (z >> 31)


def micro_batch_seed(seed: int, step: int, micro: int) -> int:
    """The generator seed of one micro-batch: `micro` (0-based) of optimizer step `step` (0-based: steps done
    before it) in a run seeded `seed`. Distinct inputs give unrelated seeds (< 2**63)."""
    z = _mix(seed & _MASK)
    for part in (step, micro):
        z = _mix(z ^ (part & _MASK))
    return z >> 1  # non-negative as a signed 64-bit integer too


def draws_random(module: nn.Module) -> bool:
    """Whether `module` draws random numbers in training mode: dropout anywhere in it (loratune's adapters, an
    `nn.Dropout` of a transformers/peft model, the decoder's attention or residual dropout)."""
    for m in module.modules():
        if isinstance(m, nn.Dropout) and m.p > 0:
            return True
        if getattr(m, "lora_A", None) is not None and float(getattr(m, "dropout", 0.0) or 0.0) > 0:
            return True  # a loratune QLoRALinear (peft's layers hold nn.Dropout modules, seen above)
        cfg = getattr(m, "config", None)  # loratune's decoder's DecoderConfig, a transformers config
        if any(float(getattr(cfg, k, 0.0) or 0.0) > 0 for k in ("attention_dropout", "residual_dropout")):
            return True
    return False


class DropoutSeeds:
    """Reseeds `device`'s default generator before each micro-batch (see the module docstring)."""

    def __init__(self, seed: int, device: torch.device | str, rank: int = 0, world_size: int = 1) -> None:
        self.seed, self.device, self.rank, self.world_size = int(seed), torch.device(device), int(rank), int(world_size)

    def generator(self) -> torch.Generator:
        """The default generator of the training device (the one dropout and checkpointing use)."""
        if self.device.type == "cuda":
            index = self.device.index if self.device.index is not None else torch.cuda.current_device()
            return torch.cuda.default_generators[index]
        return torch.default_generator

    def before(self, step: int, micro: int) -> None:
        """Seed the generator for this rank's micro-batch `micro` of step `step` (offset 0)."""
        self.generator().manual_seed(micro_batch_seed(self.seed, step, self.rank + micro * self.world_size))
