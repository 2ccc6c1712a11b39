"""A key/value cache for generation with the decoder: one row per sequence, a fixed capacity.

Why fixed: the tensors are allocated once ([batch, kv_heads, capacity, head_dim] per layer), so a decode
step writes in place and its shapes never change (what a captured decode step needs later). Each row
keeps its own length on the host: rows of different prompt lengths decode together.

A forward pass with a cache takes one run of new tokens per row, laid end to end (`boundaries(new)`
gives the stream's `Boundaries`, positions continuing from each row's length). Every layer writes its
keys and values at the rows' ends, then attends: each new token to its row's cached tokens and to the
new tokens before it (within the sliding window). A step of one token per row runs as one batched
attention; a prefill runs row by row. `commit` advances the lengths once all layers have run.
"""

from __future__ import annotations

import torch
from torch import Tensor

from loratune.decoder.attention import Boundaries, dense_attention
from loratune.decoder.config import DecoderConfig
from loratune.errors import LoratuneError


class CacheFull(LoratuneError):
    """More tokens than the cache was made for."""


class KVCache:
    def __init__(self, cfg: DecoderConfig, batch: int, capacity: int, dtype: torch.dtype,
                 device: torch.device | str | None = None) -> None:
        shape = (batch, cfg.num_kv_heads, capacity, cfg.head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.num_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.num_layers)]
        self.lengths = [0] * batch
        self.capacity = capacity

    @property
    def batch(self) -> int:
        return len(self.lengths)

    def boundaries(self, new_lengths: list[int] | tuple[int, ...]) -> Boundaries:
        """The stream of `new_lengths[r]` new tokens for each row r, positions continuing the cache."""
        if len(new_lengths) != self.batch:
            raise ValueError(f"the cache holds {self.batch} rows; got new tokens for {len(new_lengths)}")
        over = [r for r, (have, n) in enumerate(zip(self.lengths, new_lengths)) if have + n > self.capacity]
        if over:
            raise CacheFull(f"row {over[0]} would hold {self.lengths[over[0]] + new_lengths[over[0]]} tokens; the "
                            f"cache was made for {self.capacity}")
        return Boundaries.from_lengths(new_lengths, self.keys[0].device, offsets=self.lengths)

    def check(self, b: Boundaries) -> None:
        if list(b.offsets) != self.lengths:
            raise ValueError(f"the batch continues rows at {list(b.offsets)}, the cache holds {self.lengths}: build "
                             "it with KVCache.boundaries")

    def attend(self, layer: int, q: Tensor, k: Tensor, v: Tensor, b: Boundaries, *, scale: float,
               window: int | None, softcap: float | None) -> Tensor:
        """Store this layer's new k/v [N, H_kv, D] and attend q [N, H, D] -> [N, H, D]."""
        keys, values = self.keys[layer], self.values[layer]
        start = 0
        for row, (have, n) in enumerate(zip(b.offsets, b.lengths)):
            keys[row, :, have:have + n] = k[start:start + n].transpose(0, 1)
            values[row, :, have:have + n] = v[start:start + n].transpose(0, 1)
            start += n
        if all(n == 1 for n in b.lengths):
            return self._step(keys, values, q, b, scale, window, softcap)
        outs, start = [], 0
        for row, (have, n) in enumerate(zip(b.offsets, b.lengths)):
            total = have + n
            qpos = torch.arange(have, total, device=q.device)
            kpos = torch.arange(total, device=q.device)
            mask = kpos[None, :] <= qpos[:, None]
            if window is not None:
                mask &= (qpos[:, None] - kpos[None, :]) < window
            qr = q[start:start + n].transpose(0, 1)[None]
            out = dense_attention(qr, keys[row:row + 1, :, :total], values[row:row + 1, :, :total],
                                  mask[None, None], scale, softcap)
            outs.append(out[0].transpose(0, 1))
            start += n
        return torch.cat(outs, dim=0)

    def _step(self, keys: Tensor, values: Tensor, q: Tensor, b: Boundaries, scale: float, window: int | None,
              softcap: float | None) -> Tensor:
        """One new token per row: one attention over the rows, keys past each row's end masked."""
        total = max(b.offsets) + 1
        qpos = torch.tensor(b.offsets, device=q.device)[:, None]  # [B, 1]
        kpos = torch.arange(total, device=q.device)[None, :]
        mask = kpos <= qpos
        if window is not None:
            mask &= (qpos - kpos) < window
        out = dense_attention(q[:, :, None, :], keys[:, :, :total], values[:, :, :total], mask[:, None, None, :],
                              scale, softcap)
        return out[:, :, 0, :]

    def commit(self, b: Boundaries) -> None:
        """All layers have stored the stream of `b`: advance the rows' lengths."""
        self.lengths = [have + n for have, n in zip(b.offsets, b.lengths)]
