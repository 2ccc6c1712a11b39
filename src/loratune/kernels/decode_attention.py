"""Attention of one new token per row over a static KV cache: a Triton kernel and its plain-PyTorch reference.

    q [B, H, D] (row b's new token),  keys/values [S, H_kv, C, D] (S slots of C positions),
    slots [B], positions [B] (int64, on the device):  row b attends keys[slots[b], :, 0..positions[b]]
    (and only the last `window` of them with a sliding window), softmax(scale * q k^T, soft-capped) v.

The reference gathers the rows' keys up to a key bucket L ([B, H_kv, L, D]: a copy), masks by position and
runs SDPA (the product path with a soft-cap) with the G = H / H_kv query heads of each kv head as G queries.
The kernel reads the cache in place through the slot index, only up to each row's own position: one
program per (row, kv head) runs an online softmax over blocks of BLOCK keys for its G query heads (padded to
16 for `tl.dot`), so nothing is gathered, no mask is built and the work follows each row's length. The loop
bound is read on the device: a CUDA graph replays it for any positions. A cache longer than SPLIT_KEYS is
split into up to MAX_SPLITS ranges of keys, one program each, and the partial softmaxes combined by a
second kernel (flash-decoding): one row of a long context is then more than H_kv programs.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from loratune.kernels.nf4 import triton_available


def reference_decode_attention(q: Tensor, keys: Tensor, values: Tensor, slots: Tensor, mask: Tensor, scale: float,
                               softcap: float | None) -> Tensor:
    """q [B, H, D] over keys/values[slots, :, :L] with `mask` [B, 1, 1, L] (True: attended) -> [B, H, D]."""
    from loratune.decoder.attention import dense_attention  # the decoder's SDPA / soft-cap path (imports kernels)

    n, heads, dim = q.shape
    kv_heads, kv_len = keys.shape[1], mask.shape[-1]
    qg = q.reshape(n, kv_heads, heads // kv_heads, dim)  # query head j*G + g reads kv head j
    out = dense_attention(qg, keys[slots, :, :kv_len], values[slots, :, :kv_len], mask, scale, softcap)
    return out.reshape(n, heads, dim)


@functools.cache
def _triton_here() -> bool:
    return triton_available()


def fits_kernel(device: torch.device, head_dim: int) -> bool:
    """Whether `decode_attention` takes the Triton kernel: CUDA, a power-of-two head size of 16-256."""
    return device.type == "cuda" and 16 <= head_dim <= 256 and head_dim & (head_dim - 1) == 0 and _triton_here()


def decode_attention(q: Tensor, keys: Tensor, values: Tensor, slots: Tensor, positions: Tensor, scale: float,
                     window: int | None, softcap: float | None, mask: Tensor | None = None) -> Tensor:
    """[B, H, D]; the kernel where `fits_kernel`, else the reference with `mask` (which it then needs)."""
    if not fits_kernel(q.device, q.shape[-1]):
        if mask is None:
            raise ValueError("the reference decode attention needs the key mask")
        return reference_decode_attention(q, keys, values, slots, mask, scale, softcap)
    return triton_decode_attention(q, keys, values, slots, positions, scale, window, softcap)


SPLIT_KEYS = 512  # keys per split of a long cache (flash-decoding); a cache of at most this many is not split
MAX_SPLITS = 16


def key_splits(capacity: int, block: int = 64) -> tuple[int, int]:
    """(splits, keys per split) for a cache of `capacity` positions: fixed by the capacity, not by the rows'
    lengths, so one captured graph serves every length (splits past a row's position exit at once)."""
    splits = min(MAX_SPLITS, max(1, -(-capacity // SPLIT_KEYS)))
    splits = 1 << (splits - 1).bit_length()  # a power of two (the combination loads them as one tile)
    return splits, _chunk(capacity, splits, block)


def _chunk(capacity: int, splits: int, block: int) -> int:
    """Keys per split: the capacity shared out, rounded up to whole blocks."""
    per = -(-capacity // splits)
    return -(-per // block) * block


def triton_decode_attention(q: Tensor, keys: Tensor, values: Tensor, slots: Tensor, positions: Tensor, scale: float,
                            window: int | None, softcap: float | None, block: int = 64,
                            splits: int | None = None) -> Tensor:
    """The kernel; `splits`: of the keys (default: `key_splits` of the cache's capacity; a power of two)."""
    from loratune.kernels._decode_attention_triton import _combine_splits_kernel, _decode_attention_kernel

    n, heads, dim = q.shape
    kv_heads, capacity = keys.shape[1], keys.shape[2]
    groups = heads // kv_heads
    if splits is None:
        splits, chunk = key_splits(capacity, block)
    else:
        chunk = _chunk(capacity, splits, block)
    if q.stride(2) != 1:
        q = q.contiguous()
    out = torch.empty((n, heads, dim), dtype=q.dtype, device=q.device)
    part = ml = out
    if splits > 1:
        part = torch.empty((n, heads, splits, dim), dtype=torch.float32, device=q.device)
        ml = torch.empty((n, heads, splits, 2), dtype=torch.float32, device=q.device)
    _decode_attention_kernel[(n, kv_heads, splits)](
        q, keys, values, slots, positions, out, part, ml,
        q.stride(0), q.stride(1), keys.stride(0), keys.stride(1), keys.stride(2),
        values.stride(0), values.stride(1), values.stride(2), out.stride(0), out.stride(1),
        float(scale), float(softcap or 1.0), int(window or 0), chunk, heads,
        G=groups, G_PAD=max(16, 1 << max(groups - 1, 0).bit_length()), D=dim, BLOCK=block,
        HAS_WINDOW=window is not None, HAS_SOFTCAP=softcap is not None, IEEE=q.dtype == torch.float32,
        SPLITS=splits, num_warps=4)
    if splits > 1:
        _combine_splits_kernel[(n, heads)](part, ml, out, out.stride(0), out.stride(1), heads, SPLITS=splits, D=dim,
                                           num_warps=4)
    return out
