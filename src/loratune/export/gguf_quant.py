"""Tensor encodings of a GGUF export: which GGML type each tensor gets, and the bytes of that type.

Why our own Q4_K: the `gguf` package dequantizes Q4_K but does not quantize it (it quantizes Q8_0 and the
legacy 4/5-bit types), and llama.cpp's own quantizer is C++ (`llama-quantize`, not on PyPI). The layout is
GGML's block_q4_K, checked against `gguf.quants.dequantize` in the tests: 256 values per super-block, as 8
sub-blocks of 32 with a 6-bit scale and a 6-bit min each (packed into 12 bytes), the super-block's fp16 scale
`d` and min scale `dmin`, then the 4-bit values two per byte; a value is d * sc_j * q - dmin * m_j.
The scale and min of each sub-block come from a small search (as llama.cpp's make_qkx2_quants does, in
fewer steps): the range is shrunk from each end in a few steps and the least squared error kept. It runs in
torch, on the GPU when there is one (about 24 passes over each matrix).

Type choice per tensor (GGUF shape: the row is the fastest dimension):
- 1-D tensors (norms, biases) and `rope_freqs`: F32, as llama.cpp expects;
- f16: every matrix F16;
- q8_0: matrices whose rows are a multiple of 32 values in Q8_0, others F16;
- q4_K: matrices whose rows are a multiple of 256 values in Q4_K, except the token embedding and the
  output head, kept in Q8_0 (the usual Q4_K_M keeps the head at 6 bits; 8 is the nearest type the `gguf`
  package writes); rows that do not fit the block fall back to Q8_0 (multiple of 32) or F16.
"""

from __future__ import annotations

import math

import numpy as np
import torch

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


def _sub_block_ranges(x: torch.Tensor, steps: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """Per sub-block [n, 8, 32]: (scale, min >= 0) with x ~ scale * q - min, q in 0..15, chosen from a few
    shrunk ranges by least squared error."""
    lo = torch.clamp_max(x.amin(dim=-1), 0.0)
    hi = x.amax(dim=-1)
    best_err = torch.full_like(lo, math.inf)
    best_scale, best_min = torch.zeros_like(lo), -lo
    for k in range(steps):
        shrink = 1.0 - 0.04 * k
        for a, b in ((lo * shrink, hi), (lo, hi * shrink), (lo * shrink, hi * shrink)):
            scale = (b - a) / 15.0
            safe = torch.where(scale > 0, scale, torch.ones_like(scale))
            q = torch.clamp(torch.round((x - a[..., None]) / safe[..., None]), 0, 15)
            err = ((q * scale[..., None] + a[..., None]) - x).square().sum(dim=-1)
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_scale = torch.where(better, scale, best_scale)
            best_min = torch.where(better, -a, best_min)
    return best_scale, best_min


def quantize_q4_k(data: np.ndarray, rows_per_chunk: int = 4096, device: str | None = None) -> np.ndarray:
    """Rows of `data` (last dimension a multiple of 256) as GGML Q4_K blocks: uint8 [..., row / 256 * 144].
    Computed with torch on `device` (default: the GPU when there is one), a chunk of rows at a time."""
    if data.shape[-1] % QK_K:
        raise ValueError(f"Q4_K needs rows of a multiple of {QK_K} values, got {data.shape[-1]}")
    flat = np.ascontiguousarray(data, dtype=np.float32).reshape(-1, data.shape[-1])
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    parts = [_q4_k_blocks(torch.from_numpy(flat[i:i + rows_per_chunk]).to(device).reshape(-1, 8, 32))
             for i in range(0, flat.shape[0], rows_per_chunk)]
    blocks = np.concatenate(parts) if parts else np.zeros((0, Q4_K_BYTES), dtype=np.uint8)
    return blocks.reshape(*data.shape[:-1], data.shape[-1] // QK_K * Q4_K_BYTES)


def _q4_k_blocks(x: torch.Tensor) -> np.ndarray:
    """Super-blocks x [n, 8, 32] (fp32) -> uint8 [n, 144]."""
    n = x.shape[0]
    scale, mins = _sub_block_ranges(x)
    d = (scale.amax(dim=1) / 63.0).half().float()
    dmin = (mins.amax(dim=1) / 63.0).half().float()
    one = torch.ones_like(d)
    sc = torch.clamp(torch.round(scale / torch.where(d > 0, d, one)[:, None]), 0, 63)
    mn = torch.clamp(torch.round(mins / torch.where(dmin > 0, dmin, one)[:, None]), 0, 63)
    step = d[:, None] * sc  # the scales as stored
    offset = dmin[:, None] * mn
    safe = torch.where(step > 0, step, torch.ones_like(step))
    q = torch.clamp(torch.round((x + offset[..., None]) / safe[..., None]), 0, 15).to(torch.uint8)
    q = q.reshape(n, 4, 2, 32)
    packed = (q[:, :, 0, :] | (q[:, :, 1, :] << 4)).cpu().numpy()  # sub-blocks 2g (low nibble), 2g + 1 (high)
    sc, mn = sc.to(torch.uint8).cpu().numpy(), mn.to(torch.uint8).cpu().numpy()
    return np.concatenate([d.half().cpu().numpy().view(np.uint8).reshape(n, 2),
                           dmin.half().cpu().numpy().view(np.uint8).reshape(n, 2),
                           _pack_scales(sc, mn), packed.reshape(n, 128)], axis=1)
