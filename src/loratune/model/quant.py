"""Precision of the frozen base: the compute dtype and the bitsandbytes quantization config."""

from __future__ import annotations

import torch
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
