"""NF4 dequantization of a bitsandbytes 4-bit weight: a Triton kernel and its plain-PyTorch reference.

Why our own kernel: bitsandbytes dequantizes a double-quantized weight in two launches (the absmax
constants first, into a temporary, then the weight). The Triton kernel reads the packed weight, the
8-bit absmax and the second-level constants once and writes the bf16/fp16 weight in one pass: per
value, 0.5 byte read + 2 bytes written.

Layout (bitsandbytes 0.4x-0.50, `Params4bit` + `QuantState`), n = out * in values, row-major:
    packed   uint8 [n/2]        byte i holds value 2i in its high nibble and value 2i+1 in its low one
    code     fp32 [16]          the NF4 (or FP4) table
    absmax   blocksize=64 values share one scale; if `nested` (double quantization) absmax is uint8 and
             scale_b = state2.code[absmax[b]] * state2.absmax[b // state2.blocksize] + offset,
             else absmax is fp32 and scale_b = absmax[b]
    value_k  = code[nibble_k] * scale_{k // blocksize}   computed in fp32, then rounded to the dtype.
"""

from __future__ import annotations

import torch
from torch import Tensor


def _scales(qs) -> Tensor:
    """fp32 absmax per block of `qs.blocksize` values (undoing double quantization)."""
    if not qs.nested:
        return qs.absmax.float()
    s2 = qs.state2
    n = qs.absmax.numel()
    blocks2 = torch.arange(n, device=qs.absmax.device) // s2.blocksize
    return s2.code.to(qs.absmax.device)[qs.absmax.long()] * s2.absmax[blocks2] + qs.offset


def reference_dequantize_nf4(packed: Tensor, qs) -> Tensor:
    """Plain PyTorch dequantization of a 4-bit weight; returns [out, in] in `qs.dtype`."""
    n = qs.shape.numel() if hasattr(qs.shape, "numel") else int(torch.Size(qs.shape).numel())
    b = packed.reshape(-1).view(torch.uint8).long()
    nibbles = torch.stack([b >> 4, b & 0xF], dim=1).reshape(-1)[:n]
    values = qs.code.to(packed.device)[nibbles]
    scale = _scales(qs)[torch.arange(n, device=packed.device) // qs.blocksize]
    return (values * scale).reshape(qs.shape).to(qs.dtype)


def dequantize_nf4(packed: Tensor, qs, dtype: torch.dtype | None = None, triton: bool = True) -> Tensor:
    """Dequantize a bitsandbytes 4-bit weight to [out, in]: one Triton kernel on CUDA (unless `triton` is False),
    the reference elsewhere."""
    dtype = dtype or qs.dtype
    if triton and packed.is_cuda and triton_available():
        from loratune.kernels._nf4_triton import dequantize_nf4_triton

        return dequantize_nf4_triton(packed, qs, dtype)
    return reference_dequantize_nf4(packed, qs).to(dtype)


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True
