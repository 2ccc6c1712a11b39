"""Precision of the frozen base: the compute dtype, the bitsandbytes quantization config, and the 4-bit layout.

The layout matters because bitsandbytes (0.50 here) has a CPU inference kernel of its own: on a CPU with
AVX512-BF16, a `Linear4bit` called in eval mode with an input that needs no gradient repacks its weight,
once and for good, into a layout only `gemv_4bit` reads (its absmax rounded to bf16 on the way). From then
on `matmul_4bit` sends every input to `gemv_4bit`, which has no autograd formula: no gradient crosses the
layer, whatever mode the model is in later. A single no-grad evaluation before training (sample answers,
an eval loss, a check that an adapter starts at the base) would leave most adapters untrainable. So every
4-bit base loratune loads keeps the standard layout (`keep_standard_4bit_layout`), and adapters refuse a
base that was repacked before it reached us (`repacked_4bit_layers`).
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import BitsAndBytesConfig

from loratune.config import QuantizationConfig

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def resolve_compute_dtype(name: str) -> torch.dtype:
    """`auto` picks bf16 on a GPU that supports it (as the paper does), fp16 on older GPUs, fp32 on CPU.

    CPUs without native bf16 matmuls run bf16 many times slower than fp32, and memory is rarely the
    constraint there, so fp32 is the sensible CPU default.
    """
    if name != "auto":
        return DTYPES[name]
    if torch.cuda.is_available():
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def bnb_config(q: QuantizationConfig, compute_dtype: torch.dtype) -> BitsAndBytesConfig | None:
    """The BitsAndBytesConfig for 4- or 8-bit bases; None for 16/32-bit."""
    if q.bits == 4:
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=q.quant_type,
            bnb_4bit_use_double_quant=q.double_quant,
            bnb_4bit_compute_dtype=compute_dtype,
            bnb_4bit_quant_storage=torch.uint8,
        )
    if q.bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True)
    return None


def keep_standard_4bit_layout(model: nn.Module) -> int:
    """Switch off bitsandbytes' CPU repacking on every 4-bit layer of `model`; returns how many were switched.

    `support_avx512bf16_for_cpu` is the public per-layer switch `Linear4bit.forward` consults before repacking
    (set from the CPU's features when the layer is built). Turned off, a layer keeps the layout training uses
    on every device, so gradients always flow through `MatMul4Bit` and evaluation and training see the same
    dequantized weights. Called once, when the base is loaded; nothing is changed per batch.
    """
    changed = 0
    for module in model.modules():
        if getattr(module, "support_avx512bf16_for_cpu", False):
            module.support_avx512bf16_for_cpu = False
            changed += 1
    return changed


def repacked_4bit_layers(model: nn.Module) -> list[str]:
    """Names of the 4-bit layers whose weights bitsandbytes has already repacked for its CPU inference kernel."""
    return [name for name, module in model.named_modules()
            if getattr(getattr(getattr(module, "weight", None), "quant_state", None), "packing_format_for_cpu", False)]
