"""Triton kernel behind `loratune.kernels.loss` on CUDA: one chunk's cross-entropy and its gradient, in place.

Why: in PyTorch, each chunk of 16-bit logits is copied to fp32 and then goes through logsumexp, exp,
scatter and a cast back, five passes over 2^25 elements and three more copies (their cost on a GPU:
docs/benchmarks.md, "Figures behind the source's design notes"). Here one program per row
reads the row twice (online max and sum of exponentials, then the gradient) and writes the gradient over
the logits, still in their 16-bit dtype, ready for the `dz @ W` product; all arithmetic is fp32.

Per row with logits l, optional softcap c (z = c tanh(l / c), else z = l), label y:
    loss = logsumexp(z) - z[y]                (0 when y == ignore_index)
    dl   = (softmax(z) - onehot(y)) * (1 - (z / c)^2 with softcap)     (0 rows when ignored)
The PyTorch version beside it (`loss._ChunkedLinearCE`) is the reference; the GPU tests compare them.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from loratune.kernels._direct import DirectKernel


@triton.jit
def _capped(x, softcap, HAS_SOFTCAP: tl.constexpr):
    if HAS_SOFTCAP:
        x = softcap * (2.0 * tl.sigmoid(2.0 * x / softcap) - 1.0)  # c tanh(x / c)
    return x


@triton.jit
def _ce_rows(z_ptr, y_ptr, loss_ptr, vocab, stride, ignore_index, softcap, HAS_SOFTCAP: tl.constexpr,
             WRITE_GRAD: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    base = z_ptr + row * stride
    y = tl.load(y_ptr + row).to(tl.int64)
    valid = y != ignore_index
    m = tl.zeros((), dtype=tl.float32) - float("inf")
    s = tl.zeros((), dtype=tl.float32)
    for start in range(0, vocab, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        keep = cols < vocab
        z = _capped(tl.load(base + cols, mask=keep, other=0.0).to(tl.float32), softcap, HAS_SOFTCAP)
        z = tl.where(keep, z, float("-inf"))
        m_new = tl.maximum(m, tl.max(z, axis=0))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(z - m_new), axis=0)
        m = m_new
    lse = m + tl.log(s)
    y_safe = tl.where(valid, y, 0)
    z_y = _capped(tl.load(base + y_safe).to(tl.float32), softcap, HAS_SOFTCAP)
    tl.store(loss_ptr + row, tl.where(valid, lse - z_y, 0.0))
    if WRITE_GRAD:
        for start in range(0, vocab, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            keep = cols < vocab
            z = _capped(tl.load(base + cols, mask=keep, other=0.0).to(tl.float32), softcap, HAS_SOFTCAP)
            d = tl.exp(z - lse) - tl.where(cols == y, 1.0, 0.0)
            if HAS_SOFTCAP:
                t = z / softcap
                d = d * (1.0 - t * t)
            d = tl.where(valid, d, 0.0)
            tl.store(base + cols, d.to(z_ptr.dtype.element_ty), mask=keep)


_CE = DirectKernel(_ce_rows, num_warps=16)
BLOCK = 4096


def ce_rows_inplace(logits: Tensor, labels: Tensor, ignore_index: int, softcap: float | None,
                    write_grad: bool) -> Tensor:
    """logits [rows, V] (16-bit, last dim contiguous), labels [rows] -> per-row loss [rows] fp32; with
    `write_grad` the logits are overwritten by d(loss)/d(logits) (before the softcap: w.r.t. l)."""
    rows, vocab = logits.shape
    if logits.stride(1) != 1:
        raise ValueError("ce_rows_inplace needs logits with a contiguous last dimension")
    loss = torch.empty(rows, dtype=torch.float32, device=logits.device)
    _CE((rows,), logits, labels, loss, vocab, logits.stride(0), int(ignore_index),
        float(softcap) if softcap is not None else 1.0, HAS_SOFTCAP=softcap is not None, WRITE_GRAD=write_grad,
        BLOCK=BLOCK)
    return loss
