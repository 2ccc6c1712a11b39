"""Triton kernels behind `loratune.kernels.norm_swiglu`: RMSNorm (Llama form) and SiLU-gated product.

Each is one pass over its rows, forward and backward, launched directly after the first call
(`_direct.DirectKernel`). Under LoRA the norm weights are frozen, so the RMSNorm backward computes
only dx (no cross-row reduction for dw).

RMSNorm, per row x [D] (computed in fp32), weight w, eps:
    r = 1 / sqrt(mean(x^2) + eps);   y = w * round_to_dtype(x * r)       (HF Llama's rounding order)
    backward, g = dL/dy:  u = g * w;  dx = r * (u - (x r) * mean(u * x r))
SwiGLU, a = gate, b = up (fp32 inside), s = sigmoid(a):
    y = a s b;   da = g b s (1 + a (1 - s));   db = g a s
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from loratune.kernels._direct import DirectKernel


@triton.jit
def _row_of(ptr, dim, BLOCK: tl.constexpr):
    """This program's row of a [rows, dim] tensor in fp32 (zeros past dim), with its offsets and mask."""
    offsets = tl.program_id(0).to(tl.int64) * dim + tl.arange(0, BLOCK)
    keep = tl.arange(0, BLOCK) < dim
    return tl.load(ptr + offsets, mask=keep, other=0.0).to(tl.float32), offsets, keep


@triton.jit
def _rmsnorm_fwd(x_ptr, w_ptr, y_ptr, r_ptr, dim, eps, BLOCK: tl.constexpr):
    x, offsets, keep = _row_of(x_ptr, dim, BLOCK)
    r = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / dim + eps)
    w = tl.load(w_ptr + tl.arange(0, BLOCK), mask=keep, other=0.0)
    y = (x * r).to(y_ptr.dtype.element_ty).to(tl.float32) * w.to(tl.float32)
    tl.store(y_ptr + offsets, y.to(y_ptr.dtype.element_ty), mask=keep)
    tl.store(r_ptr + tl.program_id(0), r)


@triton.jit
def _rmsnorm_bwd(g_ptr, x_ptr, w_ptr, r_ptr, dx_ptr, dim, BLOCK: tl.constexpr):
    g, offsets, keep = _row_of(g_ptr, dim, BLOCK)
    x, _, _ = _row_of(x_ptr, dim, BLOCK)
    w = tl.load(w_ptr + tl.arange(0, BLOCK), mask=keep, other=0.0).to(tl.float32)
    r = tl.load(r_ptr + tl.program_id(0))
    xh = x * r
    u = g * w
    dx = r * (u - xh * (tl.sum(u * xh, axis=0) / dim))
    tl.store(dx_ptr + offsets, dx.to(dx_ptr.dtype.element_ty), mask=keep)


@triton.jit
def _swiglu_fwd(a_ptr, b_ptr, y_ptr, n, BLOCK: tl.constexpr):
    i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    keep = i < n
    a = tl.load(a_ptr + i, mask=keep, other=0.0).to(tl.float32)
    b = tl.load(b_ptr + i, mask=keep, other=0.0).to(tl.float32)
    y = a * tl.sigmoid(a) * b
    tl.store(y_ptr + i, y.to(y_ptr.dtype.element_ty), mask=keep)


@triton.jit
def _swiglu_bwd(g_ptr, a_ptr, b_ptr, da_ptr, db_ptr, n, BLOCK: tl.constexpr):
    i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    keep = i < n
    g = tl.load(g_ptr + i, mask=keep, other=0.0).to(tl.float32)
    a = tl.load(a_ptr + i, mask=keep, other=0.0).to(tl.float32)
    b = tl.load(b_ptr + i, mask=keep, other=0.0).to(tl.float32)
    s = tl.sigmoid(a)
    tl.store(da_ptr + i, (g * b * s * (1.0 + a * (1.0 - s))).to(da_ptr.dtype.element_ty), mask=keep)
    tl.store(db_ptr + i, (g * a * s).to(db_ptr.dtype.element_ty), mask=keep)


_RMS_FWD, _RMS_BWD = DirectKernel(_rmsnorm_fwd, num_warps=8), DirectKernel(_rmsnorm_bwd, num_warps=8)
_SWIGLU_FWD, _SWIGLU_BWD = DirectKernel(_swiglu_fwd), DirectKernel(_swiglu_bwd)
SWIGLU_BLOCK = 1024


def rmsnorm_forward(x2: Tensor, w: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """x2 [rows, D] contiguous -> (y [rows, D] in x's dtype, r [rows] fp32)."""
    rows, dim = x2.shape
    y = torch.empty_like(x2)
    r = torch.empty(rows, dtype=torch.float32, device=x2.device)
    _RMS_FWD((rows,), x2, w, y, r, dim, float(eps), BLOCK=triton.next_power_of_2(dim))
    return y, r


def rmsnorm_backward(g2: Tensor, x2: Tensor, w: Tensor, r: Tensor) -> Tensor:
    rows, dim = x2.shape
    dx = torch.empty_like(x2)
    _RMS_BWD((rows,), g2, x2, w, r, dx, dim, BLOCK=triton.next_power_of_2(dim))
    return dx


def swiglu_forward(a: Tensor, b: Tensor) -> Tensor:
    y = torch.empty_like(a)
    n = a.numel()
    _SWIGLU_FWD((triton.cdiv(n, SWIGLU_BLOCK),), a, b, y, n, BLOCK=SWIGLU_BLOCK)
    return y


def swiglu_backward(g: Tensor, a: Tensor, b: Tensor, in_place: bool = False) -> tuple[Tensor, Tensor]:
    """(da, db); with `in_place` written over a and b (each element is read before it is written)."""
    da, db = (a, b) if in_place else (torch.empty_like(a), torch.empty_like(b))
    n = a.numel()
    _SWIGLU_BWD((triton.cdiv(n, SWIGLU_BLOCK),), g, a, b, da, db, n, BLOCK=SWIGLU_BLOCK)
    return da, db
