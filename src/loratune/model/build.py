"""The trainable model exactly as `loratune train` runs it, in one function the benchmark calls too.

load the base in the configured precision -> activation checkpointing -> adapters (or full
fine-tuning) -> keep bitsandbytes' 4-bit layout -> the fast paths of `loratune.kernels` (CUDA only,
`model.kernels: auto`). Keeping this sequence in one place is what lets benchmarks/bench_train.py
measure the path users get rather than a hand-assembled copy of it.
"""

from __future__ import annotations

import logging

from torch import nn

from loratune import kernels
from loratune.config import Config
from loratune.model.adapters import attach_adapters, count_parameters
from loratune.model.load import enable_checkpointing, load_base

log = logging.getLogger(__name__)


def keep_4bit_layout(model: nn.Module) -> int:
    """Stop bitsandbytes from repacking 4-bit weights for its CPU inference kernel; returns layers changed.

    On CPUs with AVX512-BF16, a 4-bit layer run in eval mode without gradients (our evaluation) converts
    its weight to a packed layout, and `state_dict()` (every checkpoint save) converts it back only
    approximately ("best-effort inverse" in bitsandbytes): the frozen base would silently change in the
    middle of training, and a resumed run would no longer match. Training keeps the standard layout.
    """
    changed = 0
    for module in model.modules():
        if getattr(module, "support_avx512bf16_for_cpu", False):
            module.support_avx512bf16_for_cpu = False
            changed += 1
    return changed


def build_model(cfg: Config) -> nn.Module:
    """The model to train: base + checkpointing + adapters + fast paths, on the GPU when there is one."""
    model = load_base(cfg)
    enable_checkpointing(model, cfg)
    model = attach_adapters(model, cfg.adapter)
    keep_4bit_layout(model)
    kernels.apply(model, cfg)
    trainable, total = count_parameters(model)
    log.info("model: %s, %d-bit base, %s trainable of %s parameters (%.3f%%)", cfg.model.path,
             cfg.quantization.bits, f"{trainable:,}", f"{total:,}", 100 * trainable / max(total, 1))
    return model
