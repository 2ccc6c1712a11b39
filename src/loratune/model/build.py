"""The trainable model exactly as `loratune train` runs it, in one function the benchmark calls too.

load the base in the configured precision (4-bit layers kept in bitsandbytes' standard layout) ->
activation checkpointing -> adapters (or full fine-tuning) -> the fast paths of `loratune.kernels` (CUDA only,
`model.kernels: auto`). Keeping this sequence in one place is what lets benchmarks/bench_train.py
measure the path users get rather than a hand-assembled copy of it.
"""

from __future__ import annotations

import logging

from torch import nn

from loratune import kernels
from loratune.config import Config
from loratune.model.adapters import attach_adapters, count_parameters, weight_precision
from loratune.model.load import enable_checkpointing, load_base

log = logging.getLogger(__name__)


def build_model(cfg: Config) -> nn.Module:
    """The model to train: base + checkpointing + adapters + fast paths, on the GPU when there is one."""
    model = load_base(cfg)
    enable_checkpointing(model, cfg)
    model = attach_adapters(model, cfg.adapter)
    kernels.apply(model, cfg)
    trainable, total = count_parameters(model)
    log.info("model: %s, %s base, %s trainable of %s parameters (%.3f%%)", cfg.model.path,
             weight_precision(model), f"{trainable:,}", f"{total:,}", 100 * trainable / max(total, 1))
    return model
