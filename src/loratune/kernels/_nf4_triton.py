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


# Runners of compiled kernels by everything they were specialised on, to launch without the JIT's per-call
# argument binding and cache lookup (measured as the dominant host cost of a launch; see
# docs/benchmarks.md). Only used when every pointer is 16-byte aligned, as the JIT assumes for
# torch allocations; otherwise the normal JIT launch decides.
_COMPILED: dict[tuple, object] = {}


def dequantize_nf4_triton(packed: Tensor, qs, dtype: torch.dtype, block: int = 1024, args: tuple | None = None,
                          direct: bool = True) -> Tensor:
    """[out, in] weight in `dtype`; pass `args=kernel_args(packed, qs)` to skip rebuilding them per call."""
    shape = torch.Size(qs.shape)
    n = shape.numel()
    out = torch.empty(shape, dtype=dtype, device=packed.device)
    p, code, absmax, code2, absmax2, offset, bs2 = args if args is not None else kernel_args(packed, qs)
    grid = (triton.cdiv((n + 1) // 2, block),)
    consts = (int(qs.blocksize), bs2, bool(qs.nested), block)
    ptrs = (p, code, absmax, code2, absmax2, offset, out)
    key = (n, dtype, packed.device.index, *consts)
    runner = _COMPILED.get(key) if direct else None
    if runner is not None and all(t.data_ptr() % 16 == 0 for t in ptrs):
        runner(*ptrs, n, *consts)
        return out
    kernel = _dequant_4bit_kernel[grid](*ptrs, n, BLOCKSIZE=consts[0], BLOCKSIZE2=bs2, NESTED=consts[2], BLOCK=block,
                                        num_warps=4)
    if all(t.data_ptr() % 16 == 0 for t in ptrs):
        _COMPILED[key] = kernel[(grid[0], 1, 1)]  # the runner of the compiled kernel (all three grid dims)
    return out
