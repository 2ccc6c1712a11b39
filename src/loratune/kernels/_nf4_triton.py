"""Triton kernel behind `loratune.kernels.nf4.dequantize_nf4` (imported only where Triton exists).

One program handles BLOCK packed bytes = 2*BLOCK values: it loads the bytes, splits the nibbles, looks
both up in the 16-entry code table, rebuilds each block's scale from the double-quantized absmax (or
reads the fp32 absmax), multiplies in fp32 and stores the two values of each byte interleaved.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from loratune.kernels._direct import DirectKernel


@triton.jit
def _dequant_4bit_kernel(packed_ptr, code_ptr, absmax_ptr, code2_ptr, absmax2_ptr, offset_ptr, out_ptr, n_values,
                         BLOCKSIZE: tl.constexpr, BLOCKSIZE2: tl.constexpr, NESTED: tl.constexpr,
                         BLOCK: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    byte_idx = pid * BLOCK + tl.arange(0, BLOCK)
    n_bytes = (n_values + 1) // 2
    in_range = byte_idx < n_bytes
    byte = tl.load(packed_ptr + byte_idx, mask=in_range, other=0).to(tl.int32)
    block = (byte_idx * 2) // BLOCKSIZE  # both values of a byte share a block (BLOCKSIZE is even)
    if NESTED:
        q = tl.load(absmax_ptr + block, mask=in_range, other=0).to(tl.int32)
        scale = tl.load(code2_ptr + q) * tl.load(absmax2_ptr + block // BLOCKSIZE2, mask=in_range, other=0.0)
        scale = scale + tl.load(offset_ptr)
    else:
        scale = tl.load(absmax_ptr + block, mask=in_range, other=0.0)
    hi = tl.load(code_ptr + (byte >> 4)) * scale
    lo = tl.load(code_ptr + (byte & 15)) * scale
    values = tl.interleave(hi, lo)
    out_idx = pid * (2 * BLOCK) + tl.arange(0, 2 * BLOCK)
    tl.store(out_ptr + out_idx, values.to(out_ptr.dtype.element_ty), mask=out_idx < n_values)


def kernel_args(packed: Tensor, qs) -> tuple:
    """The tensors the kernel reads, on the weight's device; computed once per weight (no host sync:
    the double-quantization offset stays a device tensor)."""
    dev = packed.device
    code = qs.code.to(device=dev, dtype=torch.float32)
    if qs.nested:
        s2 = qs.state2
        offset = torch.as_tensor(qs.offset, dtype=torch.float32).to(dev).reshape(1)
        return (packed.view(torch.uint8), code, qs.absmax, s2.code.to(device=dev, dtype=torch.float32),
                s2.absmax.float(), offset, int(s2.blocksize))
    return packed.view(torch.uint8), code, qs.absmax.float(), code, code, code, 1


_DEQUANT = DirectKernel(_dequant_4bit_kernel, num_warps=4)  # compiled once per specialisation, then launched directly


def dequantize_nf4_triton(packed: Tensor, qs, dtype: torch.dtype, block: int = 1024, args: tuple | None = None,
                          direct: bool = True) -> Tensor:
    """[out, in] weight in `dtype`; pass `args=kernel_args(packed, qs)` to skip rebuilding them per call.

    `direct=False` launches through the JIT every time (benchmarks compare the two launch paths).
    """
    n = torch.Size(qs.shape).numel()
    out = torch.empty(qs.shape, dtype=dtype, device=packed.device)
    p, code, absmax, code2, absmax2, offset, bs2 = args if args is not None else kernel_args(packed, qs)
    launch = _DEQUANT if direct else _DEQUANT.jit
    launch((triton.cdiv((n + 1) // 2, block),), p, code, absmax, code2, absmax2, offset, out, n,
           BLOCKSIZE=int(qs.blocksize), BLOCKSIZE2=bs2, NESTED=bool(qs.nested), BLOCK=block)
    return out
