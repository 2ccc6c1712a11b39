"""Triton kernel behind `loratune.kernels.nf4_matvec.nf4_matvec` (imported only where Triton exists).

y[M, N] = x[M, K] W^T (+ bias) (+ xa[M, R] Bs^T) with W [N, K] in bitsandbytes' packed 4-bit layout
(`loratune.kernels.nf4`: byte i of the row-major weight holds value 2i in its high nibble and 2i+1 in its
low one; one scale per BLOCKSIZE values, double-quantized or fp32). The weight is read once, as bytes:
each program owns BLOCK_N output columns and one SPLIT_K-th of the reduction; per BLOCK_K slice it loads
BLOCK_N x BLOCK_K/2 bytes, looks both nibbles up in the 16-entry code table, scales them in fp32, rounds
them to x's dtype (the values bitsandbytes' dequantization produces) and multiplies them with the even and
the odd columns of x (no interleave: the high nibbles meet x[:, 0::2], the low ones x[:, 1::2]).

Scales: when every slice holds whole blocks of one row (K and BLOCK_K multiples of BLOCKSIZE: `ALIGNED`, every
Llama/Qwen/Gemma width) the BLOCK_K / BLOCKSIZE scales of each row's slice are loaded once and broadcast;
otherwise each value's block is computed and its scale gathered.

Rows: BLOCK_M == 1 multiplies and sums in fp32 (one row: the matrix units would idle); BLOCK_M >= 16 runs
`tl.dot` (fp32 accumulation). With SPLIT_K > 1 each program writes fp32 partial sums [SPLIT_K, M, N]
(summed by the caller, no atomics: the result is the same on every run, so a replayed CUDA graph and an
eager step agree); the bias and the LoRA term are added by the split 0 only.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _nf4_matvec_kernel(x_ptr, packed_ptr, code_ptr, absmax_ptr, code2_ptr, absmax2_ptr, offset_ptr,
                       bias_ptr, xa_ptr, b_ptr, out_ptr,
                       M, N, K, K_CHUNK, R, stride_xm, stride_xam, stride_bn, stride_os, stride_om,
                       BLOCKSIZE: tl.constexpr, BLOCKSIZE2: tl.constexpr, NESTED: tl.constexpr,
                       HAS_BIAS: tl.constexpr, HAS_LORA: tl.constexpr, BLOCK_M: tl.constexpr,
                       BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, R_PAD: tl.constexpr, IEEE: tl.constexpr,
                       ALIGNED: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    HALF: tl.constexpr = BLOCK_K // 2
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = rn < N
    rm = tl.arange(0, BLOCK_M)
    m_ok = rm < M
    rn64 = rn.to(tl.int64)
    half_k = K // 2
    k_start = pid_k * K_CHUNK
    k_end = tl.minimum(k_start + K_CHUNK, K)
    if BLOCK_M == 1:
        acc1 = tl.zeros([BLOCK_N], dtype=tl.float32)
    else:
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(k_start, k_end, BLOCK_K):
        kb = k0 // 2 + tl.arange(0, HALF)  # byte column of the row
        kb_ok = kb < k_end // 2
        w_ok = n_ok[:, None] & kb_ok[None, :]
        byte = tl.load(packed_ptr + rn64[:, None] * half_k + kb[None, :], mask=w_ok, other=0).to(tl.int32)
        if ALIGNED:  # the slice holds whole blocks of one row: one scale per block, broadcast over its values
            NB: tl.constexpr = BLOCK_K // BLOCKSIZE
            SPB: tl.constexpr = BLOCKSIZE // 2  # bytes per block
            block = (rn64[:, None] * K + k0) // BLOCKSIZE + tl.arange(0, NB)[None, :]  # [BLOCK_N, NB]
            b_ok = n_ok[:, None]
        else:
            block = (rn64[:, None] * K + 2 * kb[None, :]) // BLOCKSIZE  # both values of a byte share a block
            b_ok = w_ok
        if NESTED:
            q = tl.load(absmax_ptr + block, mask=b_ok, other=0).to(tl.int32)
            scale = tl.load(code2_ptr + q) * tl.load(absmax2_ptr + block // BLOCKSIZE2, mask=b_ok, other=0.0)
            scale = scale + tl.load(offset_ptr)
        else:
            scale = tl.load(absmax_ptr + block, mask=b_ok, other=0.0)
        hi = tl.load(code_ptr + (byte >> 4))
        lo = tl.load(code_ptr + (byte & 15))
        if ALIGNED:
            hi = tl.reshape(tl.reshape(hi, [BLOCK_N, NB, SPB]) * scale[:, :, None], [BLOCK_N, HALF])
            lo = tl.reshape(tl.reshape(lo, [BLOCK_N, NB, SPB]) * scale[:, :, None], [BLOCK_N, HALF])
        else:
            hi = hi * scale
            lo = lo * scale
        hi = hi.to(x_ptr.dtype.element_ty)
        lo = lo.to(x_ptr.dtype.element_ty)
        if BLOCK_M == 1:
            xe = tl.load(x_ptr + 2 * kb, mask=kb_ok, other=0.0).to(tl.float32)
            xo = tl.load(x_ptr + 2 * kb + 1, mask=kb_ok, other=0.0).to(tl.float32)
            acc1 += tl.sum(hi.to(tl.float32) * xe[None, :], axis=1) + tl.sum(lo.to(tl.float32) * xo[None, :], axis=1)
        else:
            x_ok = m_ok[:, None] & kb_ok[None, :]
            xrow = x_ptr + rm[:, None] * stride_xm + 2 * kb[None, :]
            xe = tl.load(xrow, mask=x_ok, other=0.0)
            xo = tl.load(xrow + 1, mask=x_ok, other=0.0)
            if IEEE:
                acc = tl.dot(xe, tl.trans(hi), acc, input_precision="ieee")
                acc = tl.dot(xo, tl.trans(lo), acc, input_precision="ieee")
            else:
                acc = tl.dot(xe, tl.trans(hi), acc)
                acc = tl.dot(xo, tl.trans(lo), acc)
    if BLOCK_M == 1:
        acc = acc1[None, :]
    if pid_k == 0:
        if HAS_BIAS:
            acc += tl.load(bias_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        if HAS_LORA:  # xa [M, R] (x A^T, computed by the caller) times Bs^T [R, N] (B with the scale folded in)
            rr = tl.arange(0, R_PAD)
            r_ok = rr < R
            xa = tl.load(xa_ptr + rm[:, None] * stride_xam + rr[None, :], mask=m_ok[:, None] & r_ok[None, :],
                         other=0.0)
            bs = tl.load(b_ptr + rn64[:, None] * stride_bn + rr[None, :], mask=n_ok[:, None] & r_ok[None, :],
                         other=0.0)
            if BLOCK_M == 1:
                acc += tl.sum(xa.to(tl.float32) * bs.to(tl.float32), axis=1)[None, :]
            elif IEEE:
                acc = tl.dot(xa, tl.trans(bs), acc, input_precision="ieee")
            else:
                acc = tl.dot(xa, tl.trans(bs), acc)
    out = out_ptr + pid_k * stride_os + rm[:, None] * stride_om + rn[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


@triton.jit
def _sum_splits_kernel(part_ptr, out_ptr, SPLIT, MN, BLOCK: tl.constexpr):
    """out[i] = sum over s of part[s, i] (fp32, in split order), stored in out's dtype: the partial sums of a split
    reduction in one launch (not a sum and a cast)."""
    idx = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = idx < MN
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for s in range(SPLIT):
        acc += tl.load(part_ptr + s * MN + idx, mask=ok, other=0.0)
    tl.store(out_ptr + idx, acc.to(out_ptr.dtype.element_ty), mask=ok)
