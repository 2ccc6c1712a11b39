"""Triton kernel behind `loratune.kernels.decode_attention` (imported only where Triton exists).

Program (b, j): row b, kv head j, its G query heads as the rows of a [G_PAD, D] tile. Keys from the start of
the row's window (0 without one) to its position, BLOCK at a time, read in place at keys[slot_b, j]:
    s = scale * q k^T  (fp32; soft-capped: cap * tanh(s / cap));  keys past the position or outside the window
    set to -inf;  online softmax: m' = max(m, max s), l = l e^(m - m') + sum e^(s - m'),
    acc = acc e^(m - m') + e^(s - m') v;  out = acc / l
A long cache is split (flash-decoding): program (b, j, s) takes keys [s * chunk, (s + 1) * chunk) only and
writes its unnormalised acc with its (m, l); `_combine_splits_kernel` rescales the splits to their common
maximum and divides. A split holding no attended key (past the row's position, before its window) leaves
m = -inf, l = 0, acc = 0 (its loop runs no block) and weighs nothing in the combination. Within a split the
first block holds an attended key, so m is finite after it.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _decode_attention_kernel(q_ptr, k_ptr, v_ptr, slots_ptr, pos_ptr, out_ptr, part_ptr, ml_ptr,
                             stride_qb, stride_qh, stride_ks, stride_kh, stride_kc, stride_vs, stride_vh, stride_vc,
                             stride_ob, stride_oh, scale, softcap, window, chunk, H,
                             G: tl.constexpr, G_PAD: tl.constexpr, D: tl.constexpr, BLOCK: tl.constexpr,
                             HAS_WINDOW: tl.constexpr, HAS_SOFTCAP: tl.constexpr, IEEE: tl.constexpr,
                             SPLITS: tl.constexpr):
    b = tl.program_id(0)
    j = tl.program_id(1)
    split = tl.program_id(2)
    slot = tl.load(slots_ptr + b).to(tl.int64)
    pos = tl.load(pos_ptr + b).to(tl.int32)
    g = tl.arange(0, G_PAD)
    g_ok = g < G
    d = tl.arange(0, D)
    heads = j * G + g
    q = tl.load(q_ptr + b * stride_qb + heads[:, None] * stride_qh + d[None, :], mask=g_ok[:, None], other=0.0)
    m = tl.full([G_PAD], float("-inf"), dtype=tl.float32)
    l_sum = tl.zeros([G_PAD], dtype=tl.float32)
    acc = tl.zeros([G_PAD, D], dtype=tl.float32)
    first = split * chunk  # this split's keys: [split * chunk, (split + 1) * chunk), chunk a multiple of BLOCK
    last = tl.minimum(pos, first + chunk - 1)
    if HAS_WINDOW:
        first = tl.maximum(first, pos - window + 1)
    start = (first // BLOCK) * BLOCK
    k_base = k_ptr + slot * stride_ks + j * stride_kh
    v_base = v_ptr + slot * stride_vs + j * stride_vh
    for k0 in range(start, last + 1, BLOCK):
        kk = k0 + tl.arange(0, BLOCK)
        ok = (kk <= last) & (kk >= first)
        k = tl.load(k_base + kk[:, None] * stride_kc + d[None, :], mask=ok[:, None], other=0.0)
        v = tl.load(v_base + kk[:, None] * stride_vc + d[None, :], mask=ok[:, None], other=0.0)
        if IEEE:
            s = tl.dot(q, tl.trans(k), input_precision="ieee")
        else:
            s = tl.dot(q, tl.trans(k))
        s = s * scale
        if HAS_SOFTCAP:  # tanh(y) = 2 / (1 + e^(-2y)) - 1
            s = softcap * (2.0 / (1.0 + tl.exp(-2.0 * (s / softcap))) - 1.0)
        s = tl.where(ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, axis=1))
        alpha = tl.exp(m - m_new)
        p = tl.exp(s - m_new[:, None])
        l_sum = l_sum * alpha + tl.sum(p, axis=1)
        if IEEE:
            acc = acc * alpha[:, None] + tl.dot(p, v, input_precision="ieee")
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m = m_new
    if SPLITS == 1:
        out = acc / l_sum[:, None]
        tl.store(out_ptr + b * stride_ob + heads[:, None] * stride_oh + d[None, :], out.to(out_ptr.dtype.element_ty),
                 mask=g_ok[:, None])
    else:  # partial results: acc [B, H, SPLITS, D] and (m, l) [B, H, SPLITS, 2] in fp32 (an empty split: -inf, 0)
        row = (b * H + heads) * SPLITS + split
        tl.store(part_ptr + row[:, None] * D + d[None, :], acc, mask=g_ok[:, None])
        tl.store(ml_ptr + row * 2, m, mask=g_ok)
        tl.store(ml_ptr + row * 2 + 1, l_sum, mask=g_ok)


@triton.jit
def _combine_splits_kernel(part_ptr, ml_ptr, out_ptr, stride_ob, stride_oh, H, SPLITS: tl.constexpr,
                           D: tl.constexpr):
    """out[b, h] = sum_s e^(m_s - M) acc_s / sum_s e^(m_s - M) l_s, M = max_s m_s (splits without keys: m = -inf)."""
    b = tl.program_id(0)
    h = tl.program_id(1)
    s = tl.arange(0, SPLITS)
    d = tl.arange(0, D)
    row = (b * H + h) * SPLITS + s
    m = tl.load(ml_ptr + row * 2)
    l_sum = tl.load(ml_ptr + row * 2 + 1)
    top = tl.max(m, axis=0)
    w = tl.where(m == float("-inf"), 0.0, tl.exp(m - top))
    acc = tl.load(part_ptr + row[:, None] * D + d[None, :])
    out = tl.sum(acc * w[:, None], axis=0) / tl.sum(l_sum * w, axis=0)
    tl.store(out_ptr + b * stride_ob + h * stride_oh + d, out.to(out_ptr.dtype.element_ty))
