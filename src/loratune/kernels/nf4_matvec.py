"""A 4-bit (NF4/FP4) linear layer for a few rows (decoding), the LoRA update in the same call: a Triton kernel
and its plain-PyTorch reference.

Why: a decode step multiplies 1-32 rows by every weight of the model. The general path (`kernels.nf4`)
dequantizes each weight to a 16-bit copy (0.5 byte read, 2 bytes written, 2 read again by the product per
value): five times the bytes of the 4-bit weight itself, and a step is bound by bytes. The kernel reads the
packed weight once and dequantizes in registers (`_nf4_matvec_triton`), so a step moves about the 4-bit
weight's size.

    y = x W^T + b + (x A^T) Bs^T        W [out, in] 4-bit, A [r, in], Bs = scale * B [out, r]

`xa = x A^T` ([M, r], a tiny product) is computed first with torch; the kernel adds `xa Bs^T` to its
output columns before storing them. A, Bs (and b) are given in x's dtype (the caller casts them once).
`nf4_matvec` takes the kernel on CUDA for at most `MAX_ROWS` rows when Triton is there, else the reference:
the weight dequantized (`kernels.nf4.dequantize_nf4`, bitsandbytes' values) and multiplied. Both round every
weight value to x's dtype and accumulate in fp32; they differ in summation order only.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import Tensor

from loratune.kernels.nf4 import dequantize_nf4, reference_dequantize_nf4, triton_available

MAX_ROWS = 32  # more rows than this: dequantize once and run a matrix product (the weight is read once either way)


def reference_nf4_matvec(x: Tensor, packed: Tensor, qs, bias: Tensor | None = None,
                         lora: tuple[Tensor, Tensor] | None = None) -> Tensor:
    """Plain PyTorch: x [M, in] times the dequantized weight, + bias, + (x A^T) Bs^T; in x's dtype."""
    y = F.linear(x, reference_dequantize_nf4(packed, qs).to(x.dtype), bias)
    if lora is not None:
        y = y + F.linear(F.linear(x, lora[0]), lora[1])
    return y


_triton_here = functools.cache(triton_available)  # asked for every layer of every eager step


def fits_kernel(x: Tensor, qs) -> bool:
    """Whether `nf4_matvec` runs the Triton kernel for x [M, in] (else the dequantize-and-multiply path)."""
    return (x.is_cuda and x.dim() == 2 and x.shape[0] <= MAX_ROWS and x.shape[1] % 2 == 0
            and int(qs.blocksize) % 2 == 0 and _triton_here())


def nf4_matvec(x: Tensor, packed: Tensor, qs, bias: Tensor | None = None, lora: tuple[Tensor, Tensor] | None = None,
               args: tuple | None = None, xa: Tensor | None = None) -> Tensor:
    """y [M, out] in x's dtype (see the module docstring); `args`: `kernels._nf4_triton.kernel_args(packed, qs)`,
    kept by the caller so that nothing is rebuilt per call. `xa`: x A^T [M, r] when the caller made it already
    (layers reading the same x: one product with their A matrices stacked), else made here."""
    if lora is not None and xa is None:
        xa = F.linear(x, lora[0])
    if not fits_kernel(x, qs):
        y = F.linear(x, dequantize_nf4(packed, qs, x.dtype), bias)
        if lora is not None:
            y = y + F.linear(xa, lora[1])
        return y
    return _triton_matvec(x.contiguous(), packed, qs, bias, lora, args, xa)


def _split_k(n_blocks: int, k: int, block_k: int) -> int:
    """Reduction splits so that the grid has about 4 programs per SM of an H100/H200 (132): a matrix-vector
    product needs every SM streaming the weight."""
    split = 1
    while n_blocks * split < 512 and k // (block_k * split * 2) >= 2:
        split *= 2
    return split


def _triton_matvec(x: Tensor, packed: Tensor, qs, bias: Tensor | None, lora: tuple[Tensor, Tensor] | None,
                   args: tuple | None, xa: Tensor | None = None) -> Tensor:
    import triton

    from loratune.kernels._nf4_matvec_triton import _nf4_matvec_kernel, _sum_splits_kernel
    from loratune.kernels._nf4_triton import kernel_args

    m, k = x.shape
    n = int(qs.shape[0])
    if int(qs.shape[1]) != k:
        raise ValueError(f"x has {k} features, the 4-bit weight takes {int(qs.shape[1])}")
    p, code, absmax, code2, absmax2, offset, bs2 = args if args is not None else kernel_args(packed, qs)
    block_m = 1 if m == 1 else max(16, 1 << (m - 1).bit_length())
    block_n, block_k = (32, 256) if block_m > 16 else (64, 256)
    n_blocks = -(-n // block_n)
    split = _split_k(n_blocks, k, block_k)
    chunk = -(-k // (split * block_k)) * block_k
    split = -(-k // chunk)
    out = torch.empty((split, m, n), dtype=x.dtype if split == 1 else torch.float32, device=x.device)
    if lora is not None and xa is None:
        xa = F.linear(x, lora[0])
    b = None if lora is None else lora[1].contiguous()
    if xa is not None and xa.stride(1) != 1:
        xa = xa.contiguous()
    r = 0 if b is None else int(b.shape[1])
    dummy = x
    _nf4_matvec_kernel[(n_blocks, split)](
        x, p, code, absmax, code2, absmax2, offset,
        dummy if bias is None else bias, dummy if xa is None else xa, dummy if b is None else b, out,
        m, n, k, chunk, r, x.stride(0), 0 if xa is None else xa.stride(0), 0 if b is None else b.stride(0),
        out.stride(0), out.stride(1),
        BLOCKSIZE=int(qs.blocksize), BLOCKSIZE2=bs2, NESTED=bool(qs.nested), HAS_BIAS=bias is not None,
        HAS_LORA=b is not None, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
        R_PAD=max(16, 1 << max(r - 1, 0).bit_length()), IEEE=x.dtype == torch.float32,
        ALIGNED=k % block_k == 0 and block_k % int(qs.blocksize) == 0, num_warps=4)
    if split == 1:
        return out[0]
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    _sum_splits_kernel[(triton.cdiv(m * n, 1024),)](out, y, split, m * n, BLOCK=1024, num_warps=4)
    return y
