"""A key/value cache for generation with the decoder: preallocated slots of a fixed capacity.

Why preallocated: the tensors are made once ([slots, kv_heads, capacity, head_dim] per layer), so a decode
step writes in place and its shapes never change, which is what a captured (CUDA-graphed) decode step
needs. A slot holds one sequence; each slot keeps its own length on the host, so sequences of different
lengths decode together, and a slot can be emptied (`release`) and refilled while the others go on
(continuous batching).

A forward pass with a cache takes one run of new tokens for each of some slots, laid end to end:
`boundaries(new_lengths, slots)` gives the stream's `Boundaries` (positions continuing each slot's
length) and marks those slots as the pass's. Every layer writes its keys and values at the slots' ends
(one indexed write for the whole stream), then attends:
- a fresh prefill (every slot empty): the ordinary attention over the stream (flash-attn's varlen kernel
  where the decoder uses it, else SDPA; the prompts are samples with boundaries, no padding), since no
  cached token exists yet;
- one new token per slot (a decode step): one batched attention over the slots' cached keys, keys past
  each slot's end (and outside the sliding window) masked;
- otherwise (runs continuing cached prompts): one masked attention over the slots, each run's queries padded
  to the longest run.
`commit` advances the slots' lengths once all layers have run.

Lengths live on the host (each pass builds its `Boundaries` from them) and, mirrored, on the device
(`device_lengths`, int64 [slots]): the CUDA-graphed decode step (`loratune.decoder.decode_step`) reads its
positions there and advances them itself, then tells the host mirror (`advanced`), which needs no read back.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from loratune.decoder.attention import Boundaries, attend, dense_attention
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
        self.device_lengths = torch.zeros(batch, dtype=torch.long, device=device)
        self.capacity = capacity
        # the pass in progress: its boundaries, its slots, and each stream token's slot on the device
        self._pass: tuple[Boundaries, tuple[int, ...], Tensor] | None = None

    @property
    def batch(self) -> int:
        """The number of slots."""
        return len(self.lengths)

    def boundaries(self, new_lengths: Sequence[int], slots: Sequence[int] | None = None) -> Boundaries:
        """The stream of `new_lengths[i]` new tokens for slot `slots[i]` (default: every slot, in order),
        positions continuing the slots' lengths; the next forward pass with this cache is this one."""
        slots = tuple(range(self.batch)) if slots is None else tuple(int(s) for s in slots)
        if len(new_lengths) != len(slots):
            raise ValueError(f"new tokens for {len(new_lengths)} rows, but {len(slots)} slots "
                             f"(the cache holds {self.batch})")
        if len(set(slots)) != len(slots) or any(not 0 <= s < self.batch for s in slots):
            raise ValueError(f"slots {list(slots)}: expected distinct slots in [0, {self.batch})")
        over = [s for s, n in zip(slots, new_lengths) if self.lengths[s] + n > self.capacity]
        if over:
            raise CacheFull(f"row {over[0]} would hold {self.lengths[over[0]] + new_lengths[slots.index(over[0])]} "
                            f"tokens; the cache was made for {self.capacity}")
        device = self.keys[0].device
        b = Boundaries.from_lengths(list(new_lengths), device, offsets=[self.lengths[s] for s in slots])
        index = torch.tensor(slots, dtype=torch.long, device=device)[b.sample_ids]
        self._pass = (b, slots, index)
        return b

    def check(self, b: Boundaries) -> None:
        """`b` must be the pass `boundaries` made last (or, for every slot, continue them where they are)."""
        if self._pass is not None and self._pass[0] is b:
            return
        if len(b.lengths) == self.batch and list(b.offsets) == self.lengths:
            self._pass = (b, tuple(range(self.batch)),
                          b.sample_ids.to(device=self.keys[0].device, dtype=torch.long))
            return
        raise ValueError(f"the batch continues rows at {list(b.offsets)}, the cache holds {self.lengths}: build "
                         "it with KVCache.boundaries")

    def _current(self, b: Boundaries) -> tuple[tuple[int, ...], Tensor]:
        self.check(b)
        assert self._pass is not None
        return self._pass[1], self._pass[2]

    def attend(self, layer: int, q: Tensor, k: Tensor, v: Tensor, b: Boundaries, *, scale: float,
               window: int | None, softcap: float | None, backend: str | None = None) -> Tensor:
        """Store this layer's new k/v [N, H_kv, D] and attend q [N, H, D] -> [N, H, D].

        `backend`: the decoder's attention implementation; a fresh prefill runs on flash when that is it, else
        on sdpa (FlexAttention would compile for every new prompt length). None: always the cached paths."""
        slots, index = self._current(b)
        keys, values = self.keys[layer], self.values[layer]
        keys[index, :, b.positions] = k.to(keys.dtype)
        values[index, :, b.positions] = v.to(values.dtype)
        if backend is not None and not any(b.offsets):
            return attend(q, k, v, b, scale=scale, window=window, softcap=softcap,
                          backend="flash" if backend == "flash" else "sdpa")
        if all(n == 1 for n in b.lengths):
            return self._step(keys, values, q, b, slots, scale, window, softcap)
        return self._continue(keys, values, q, b, slots, scale, window, softcap)

    def _rows(self, b: Boundaries, slots: tuple[int, ...], device: torch.device) -> Tensor | None:
        """The pass's slots as a device index (None: every slot, in order), made once per pass."""
        if slots == tuple(range(self.batch)):
            return None
        if "cache_rows" not in b._derived:
            b._derived["cache_rows"] = torch.tensor(slots, dtype=torch.long, device=device)
        return b._derived["cache_rows"]

    def _continue(self, keys: Tensor, values: Tensor, q: Tensor, b: Boundaries, slots: tuple[int, ...], scale: float,
                  window: int | None, softcap: float | None) -> Tensor:
        """Runs of new tokens continuing their slots: one masked attention over the slots, each run's queries
        padded to the longest run (a padding query repeats its run's last one and is dropped), keys past each
        query's position (and outside the window) masked. The layout and mask are made once per pass (every
        layer attends the same way), so no layer copies from the host."""
        device = q.device
        total = max(o + n for o, n in zip(b.offsets, b.lengths))
        longest = max(b.lengths)
        key = ("cache_continue", window)
        if key not in b._derived:
            offsets = torch.tensor(b.offsets, dtype=torch.long, device=device)
            within = b.positions - offsets[b.sample_ids]  # each token's place in its run
            last = offsets + torch.tensor(b.lengths, dtype=torch.long, device=device) - 1
            # [S, longest]; a padding query takes its run's last position (never a row with every key masked)
            qpos = torch.minimum(offsets[:, None] + torch.arange(longest, device=device)[None, :], last[:, None])
            kpos = torch.arange(total, device=device)
            mask = kpos[None, None, :] <= qpos[:, :, None]
            if window is not None:
                mask &= (qpos[:, :, None] - kpos[None, None, :]) < window
            b._derived[key] = (within, mask[:, None])
        within, mask = b._derived[key]
        rows = self._rows(b, slots, device)
        k, v = (keys[:, :, :total], values[:, :, :total]) if rows is None else (keys[rows, :, :total],
                                                                               values[rows, :, :total])
        qr = q.new_zeros(len(slots), longest, q.shape[1], q.shape[2])
        qr[b.sample_ids, within] = q
        out = dense_attention(qr.transpose(1, 2), k, v, mask, scale, softcap)  # [S, H, longest, D]
        return out.transpose(1, 2)[b.sample_ids, within]

    def _step(self, keys: Tensor, values: Tensor, q: Tensor, b: Boundaries, slots: tuple[int, ...], scale: float,
              window: int | None, softcap: float | None) -> Tensor:
        """One new token per slot: one attention over the slots, keys past each slot's end masked (the mask made
        once per pass)."""
        total = max(b.offsets) + 1
        key = ("cache_step", window)
        if key not in b._derived:
            qpos = torch.tensor(b.offsets, device=q.device)[:, None]  # [B, 1]
            kpos = torch.arange(total, device=q.device)[None, :]
            mask = kpos <= qpos
            if window is not None:
                mask &= (qpos - kpos) < window
            b._derived[key] = mask[:, None, None, :]
        rows = self._rows(b, slots, q.device)
        k, v = (keys[:, :, :total], values[:, :, :total]) if rows is None else (keys[rows, :, :total],
                                                                               values[rows, :, :total])
        out = dense_attention(q[:, :, None, :], k, v, b._derived[key], scale, softcap)
        return out[:, :, 0, :]

    def commit(self, b: Boundaries) -> None:
        """All layers have stored the stream of `b`: advance its slots' lengths."""
        slots, _ = self._current(b)
        for slot, have, n in zip(slots, b.offsets, b.lengths):
            self.lengths[slot] = have + n
        self._sync_device(slots)
        self._pass = None

    def _sync_device(self, slots: Sequence[int]) -> None:
        """Copy these slots' host lengths to `device_lengths` (one small host-to-device copy)."""
        device = self.device_lengths.device
        index = torch.tensor(list(slots), dtype=torch.long, device=device)
        self.device_lengths[index] = torch.tensor([self.lengths[s] for s in slots], dtype=torch.long, device=device)

    def advanced(self, slots: Sequence[int]) -> None:
        """A decode step advanced `device_lengths` of these (distinct) slots by one: do the same on the host."""
        over = [s for s in slots if self.lengths[s] + 1 > self.capacity]
        if over:
            raise CacheFull(f"row {over[0]} would hold {self.lengths[over[0]] + 1} tokens; the cache was made for "
                            f"{self.capacity}")
        for s in slots:
            self.lengths[s] += 1

    def rewind(self, slots: Sequence[int], lengths: Sequence[int]) -> None:
        """Shorten these slots to `lengths` tokens (no longer than they are): the tokens after are forgotten, their
        keys and values overwritten by the next pass (scoring several continuations of one cached context)."""
        for s, n in zip(slots, lengths):
            if not 0 <= int(n) <= self.lengths[int(s)]:
                raise ValueError(f"slot {s} holds {self.lengths[int(s)]} tokens: cannot rewind it to {n}")
            self.lengths[int(s)] = int(n)
        if len(slots):
            self._sync_device([int(s) for s in slots])

    def release(self, slots: Sequence[int]) -> None:
        """Empty these slots (their next tokens start at position 0); the tensors stay allocated."""
        for s in slots:
            self.lengths[int(s)] = 0
        if len(slots):
            self._sync_device([int(s) for s in slots])
