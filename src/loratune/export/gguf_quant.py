"""Tensor encodings of a GGUF export: which GGML type each tensor gets, and the bytes of that type.

Why our own Q4_K: the `gguf` package dequantizes Q4_K but does not quantize it (it quantizes Q8_0 and the
legacy 4/5-bit types), and llama.cpp's own quantizer is C++ (`llama-quantize`, not on PyPI). The layout is
GGML's block_q4_K, checked against `gguf.quants.dequantize` in the tests: 256 values per super-block, as 8
sub-blocks of 32 with a 6-bit scale and a 6-bit min each (packed into 12 bytes), the super-block's fp16 scale
`d` and min scale `dmin`, then the 4-bit values two per byte; a value is d * sc_j * q - dmin * m_j.
The scale and min of each sub-block come from a small search (as llama.cpp's make_qkx2_quants does, in
fewer steps): the range is shrunk from each end in a few steps and the least squared error kept.

Type choice per tensor (GGUF shape: the row is the fastest dimension):
- 1-D tensors (norms, biases) and `rope_freqs`: F32, as llama.cpp expects;
- f16: every matrix F16;
- q8_0: matrices whose rows are a multiple of 32 values in Q8_0, others F16;
- q4_K: matrices whose rows are a multiple of 256 values in Q4_K, except the token embedding and the
  output head, kept in Q8_0 (the usual Q4_K_M keeps the head at 6 bits; 8 is the nearest type the `gguf`
  package writes); rows that do not fit the block fall back to Q8_0 (multiple of 32) or F16.
"""

from __future__ import annotations

import numpy as np

QK_K = 256
Q4_K_BYTES = 2 + 2 + 12 + QK_K // 2  # d, dmin, packed scales and mins, 4-bit values
KINDS = ("f16", "q8_0", "q4_K")
KEEP_8BIT = ("token_embd.weight", "output.weight")


def tensor_type(kind: str, name: str, shape: tuple[int, ...]):
    """The GGMLQuantizationType of tensor `name` (numpy shape, rows last) in a `kind` export."""
    from gguf import GGMLQuantizationType as T

    if len(shape) < 2 or name.startswith("rope_freqs"):
        return T.F32
    row = shape[-1]
    if kind == "f16":
        return T.F16
    if kind == "q4_K" and row % QK_K == 0 and name not in KEEP_8BIT:
        return T.Q4_K
    if kind in ("q8_0", "q4_K") and row % 32 == 0:
        return T.Q8_0
    return T.F16


def encode(data: np.ndarray, qtype) -> np.ndarray:
    """`data` (float32) in GGML type `qtype`: a float array for F32/F16, else the uint8 blocks."""
    from gguf import GGMLQuantizationType as T
    from gguf import quants

    if qtype == T.F32:
        return data.astype(np.float32)
    if qtype == T.F16:
        return data.astype(np.float16)
    if qtype == T.Q4_K:
        return quantize_q4_k(data)
    return quants.quantize(data.astype(np.float32), qtype)


def _pack_scales(sc: np.ndarray, mn: np.ndarray) -> np.ndarray:
    """8 six-bit scales and 8 six-bit mins per block [n, 8] into GGML's 12-byte layout [n, 12]."""
    out = np.empty((sc.shape[0], 12), dtype=np.uint8)
    out[:, 0:4] = (sc[:, :4] & 63) | ((sc[:, 4:] >> 4) << 6)
    out[:, 4:8] = (mn[:, :4] & 63) | ((mn[:, 4:] >> 4) << 6)
    out[:, 8:12] = (sc[:, 4:] & 15) | ((mn[:, 4:] & 15) << 4)
    return out


def _sub_block_ranges(x: np.ndarray, steps: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """Per sub-block [n, 8, 32]: (scale, min >= 0) with x ~ scale * q - min, q in 0..15, chosen from a few
    shrunk ranges by least squared error."""
    lo = np.minimum(x.min(axis=-1), 0.0)
    hi = x.max(axis=-1)
    best_err = np.full(lo.shape, np.inf, dtype=np.float32)
    best_scale, best_min = np.zeros_like(lo), -lo
    for k in range(steps):
        shrink = 1.0 - 0.04 * k
        for a, b in ((lo * shrink, hi), (lo, hi * shrink), (lo * shrink, hi * shrink)):
            scale = (b - a) / 15.0
            safe = np.where(scale > 0, scale, 1.0)
            q = np.clip(np.rint((x - a[..., None]) / safe[..., None]), 0, 15)
            err = (((q * scale[..., None] + a[..., None]) - x) ** 2).sum(axis=-1)
            better = err < best_err
            best_err = np.where(better, err, best_err)
            best_scale = np.where(better, scale, best_scale)
            best_min = np.where(better, -a, best_min)
    return best_scale, best_min


def quantize_q4_k(data: np.ndarray) -> np.ndarray:
    """Rows of `data` (last dimension a multiple of 256) as GGML Q4_K blocks: uint8 [..., row / 256 * 144]."""
    if data.shape[-1] % QK_K:
        raise ValueError(f"Q4_K needs rows of a multiple of {QK_K} values, got {data.shape[-1]}")
    x = data.astype(np.float32).reshape(-1, 8, 32)
    n = x.shape[0]
    scale, mins = _sub_block_ranges(x)
    d = (scale.max(axis=1) / 63.0).astype(np.float16).astype(np.float32)
    dmin = (mins.max(axis=1) / 63.0).astype(np.float16).astype(np.float32)
    sd, sm = np.where(d > 0, d, 1.0), np.where(dmin > 0, dmin, 1.0)
    sc = np.clip(np.rint(scale / sd[:, None]), 0, 63).astype(np.uint8)
    mn = np.clip(np.rint(mins / sm[:, None]), 0, 63).astype(np.uint8)
    step = d[:, None] * sc  # the scales as stored
    offset = dmin[:, None] * mn
    safe = np.where(step > 0, step, 1.0)
    q = np.clip(np.rint((x + offset[..., None]) / safe[..., None]), 0, 15).astype(np.uint8)
    q = q.reshape(n, 4, 2, 32)
    packed = q[:, :, 0, :] | (q[:, :, 1, :] << 4)  # sub-blocks 2g (low nibble) and 2g + 1 (high) share bytes
    blocks = np.concatenate([d.astype(np.float16).view(np.uint8).reshape(n, 2),
                             dmin.astype(np.float16).view(np.uint8).reshape(n, 2),
                             _pack_scales(sc, mn), packed.reshape(n, 128)], axis=1)
    return blocks.reshape(*data.shape[:-1], data.shape[-1] // QK_K * Q4_K_BYTES)
