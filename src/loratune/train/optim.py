"""Optimizers and learning-rate schedules.

Weight decay never touches biases, norms or embeddings' 1-D parameters: decaying a norm's gain pulls it
toward zero, which is not regularisation but damage. LoRA+ gives the B matrices their own group with a
learning rate `lr * loraplus_ratio` (Hayou et al. 2024).
"""

from __future__ import annotations

import logging
import math

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

from loratune.config import TrainConfig

log = logging.getLogger("loratune.train")


def param_groups(model: nn.Module, cfg: TrainConfig) -> list[dict]:
    """Trainable parameters split into decay / no-decay (and LoRA-B for LoRA+) groups."""
    decay, no_decay, lora_b = [], [], []
    ratio = cfg.loraplus_ratio
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if ratio and "lora_B" in name:
            lora_b.append(p)
        elif p.ndim < 2 or "norm" in name.lower() or name.endswith(".bias"):
            no_decay.append(p)
        else:
            decay.append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay, "lr": cfg.lr, "name": "decay"},
              {"params": no_decay, "weight_decay": 0.0, "lr": cfg.lr, "name": "no_decay"}]
    if lora_b:
        groups.append({"params": lora_b, "weight_decay": cfg.weight_decay, "lr": cfg.lr * ratio, "name": "lora_B"})
    return [g for g in groups if g["params"]]


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    from loratune.train.memopt import MEMORY_EFFICIENT, build_memory_efficient

    if cfg.optimizer in MEMORY_EFFICIENT:  # GaLore, APOLLO, Adam-mini, BAdam: their own groups
        return build_memory_efficient(model, cfg)
    groups = param_groups(model, cfg)
    betas = (0.9, cfg.adam_beta2)
    if cfg.optimizer == "adamw":
        fused = all(p.is_cuda for g in groups for p in g["params"])
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=betas, fused=fused or None)
    import bitsandbytes as bnb

    paged = cfg.optimizer.startswith("paged_")
    on_gpu = all(p.is_cuda for g in groups for p in g["params"])
    if paged and not on_gpu:
        # paging is CUDA managed memory; bitsandbytes would fall back (with a warning at the first step)
        log.info("%s: paging needs a CUDA GPU; on CPU the same optimizer runs without paging", cfg.optimizer)
    cls = bnb.optim.AdamW8bit if cfg.optimizer.endswith("8bit") else bnb.optim.AdamW32bit
    return cls(groups, lr=cfg.lr, betas=betas, is_paged=paged and on_gpu)


def lr_lambda(kind: str, warmup: int, total: int):
    """Multiplier of the peak lr at step s: linear warmup over `warmup` steps, then `kind`."""

    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        if kind == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        if kind == "linear":
            return 1.0 - progress
        return 0.5 * (1.0 + math.cos(math.pi * progress))  # cosine

    return f


def warmup_steps(cfg: TrainConfig, total: int) -> int:
    return cfg.warmup_steps if cfg.warmup_steps > 0 else int(round(cfg.warmup_ratio * total))


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig, total_steps: int) -> LambdaLR:
    return LambdaLR(optimizer, lr_lambda(cfg.scheduler, warmup_steps(cfg, total_steps), total_steps))


def apply_schedule(scheduler: LambdaLR) -> list[float]:
    """Set each group's lr to this schedule's value at the scheduler's position; returns the rates.

    After a checkpoint is restored, the optimizer's groups hold the rate the checkpoint's schedule chose for
    the next step. When the run's length changed (a finished run trained further, train.max_steps raised),
    this run's schedule is built for the new total and must decide that rate instead, exactly as
    `LambdaLR.step` would have: base lr x multiplier at `last_epoch` (the optimizer steps taken, skipped
    ones excluded). With an unchanged length the value is the same float the checkpoint holds.
    """
    rates = [base * f(scheduler.last_epoch) for base, f in zip(scheduler.base_lrs, scheduler.lr_lambdas)]
    for group, rate in zip(scheduler.optimizer.param_groups, rates):
        group["lr"] = rate
    return rates
