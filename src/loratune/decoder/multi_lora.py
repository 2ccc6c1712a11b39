"""Rows of one batch on different LoRA adapters (or on the bare base): the base product once, a segmented update.

Serving several adapters by switching the one on the model (`QLoRALinear.set_adapter_state`) makes a batch
answer as one adapter: requests for another wait until it drains. Here every row of a forward pass names
its adapter, and each linear layer computes

    y = x W^T + b                                   once, for every token of the stream
    y[rows_k] += (x[rows_k] A_k^T) (s_k B_k)^T      for each adapter k present in the pass

where rows_k are the tokens of the rows on adapter k (tokens of base rows get no update). The base product,
the expensive part (the 4-bit weight read and dequantized), is shared. The A and scaled B of each adapter
are kept in the layer's compute dtype (`LoRAPair`), made once when the adapter is put on the device, so a
pass casts nothing. Two ways to the same sum:

- grouped (`segmented_lora`), for long streams (prefill): per adapter present, its tokens gathered, two
  small products, the result added back at their rows: work proportional to the tokens, four kernels per
  adapter present;
- stacked (`stacked_lora`), for a few tokens (decode steps, up to `RowPlan.stacked_tokens`): every resident
  adapter's A stacked into one [R, in] and its s B into one [out, R] (R the sum of their ranks, made once
  while the resident set stays), then  y += ((x A_all^T) * mask) B_all^T,  mask [tokens, R] keeping each
  token's own adapter's columns (zeros elsewhere, none for base rows). Three kernels whatever the mix, and
  the shapes depend only on the number of rows, so a captured (CUDA-graphed) step can replay it with the
  mask in a static buffer. Each token pays R instead of r columns: for 4 adapters of rank 16 on an 8B
  layer, ~1 MB of extra weight read per layer and step beside the base's ~8 MB.

Who says which tokens use which adapter: one `RowPlan` per decoder, filled by the caller for the duration
of one pass (`RowPlan.rows`), read by every layer's `LayerAdapters`. Layers hold their adapters by key;
adapters come and go at run time (`loratune.infer.adapters.AdapterBank` keeps them, an LRU on the device).

`reference_segmented_lora` is the plain per-token version to test against.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class LoRAPair:
    """One layer's adapter as the segmented product reads it: A [r, in] and s B [out, r], in the compute dtype."""

    a: Tensor
    b: Tensor

    @classmethod
    def of(cls, lora_a: Tensor, lora_b: Tensor, scale: float, dtype: torch.dtype) -> LoRAPair:
        """The pair for weights `lora_a`, `lora_b` (any dtype) and LoRA scale `scale`, cast to `dtype` as the fused
        kernel casts them (`AdapterCasts.get`: B cast, then multiplied by the scale)."""
        b = lora_b.detach().to(dtype)
        return cls(lora_a.detach().to(dtype), b * scale if scale != 1.0 else b)


Groups = tuple[tuple[str, "Tensor | None"], ...]


@dataclass(frozen=True)
class PassRows:
    """Which adapter each token of one pass uses: `token_keys` (None: the base) and the same as `groups`, ((key,
    token indices [n] on the device, or None for every token), ...)."""

    token_keys: tuple[str | None, ...]
    groups: Groups
    device: torch.device

    @classmethod
    def of(cls, keys: Sequence[str | None], lengths: Sequence[int], device: torch.device | str) -> PassRows:
        """A stream of rows laid end to end: row i has `lengths[i]` tokens and uses adapter `keys[i]` (None: the
        base). One group covering every token is given as (key, None): no gather, no scatter."""
        token_keys = tuple(k for k, n in zip(keys, lengths) for _ in range(n))
        where: dict[str, list[int]] = {}
        for i, key in enumerate(token_keys):
            if key is not None:
                where.setdefault(key, []).append(i)
        device = torch.device(device)
        if len(where) == 1 and len(next(iter(where.values()))) == len(token_keys):
            return cls(token_keys, ((next(iter(where)), None),), device)
        groups = tuple((key, torch.tensor(idx, dtype=torch.long, device=device)) for key, idx in where.items())
        return cls(token_keys, groups, device)

    def padded(self, tokens: int) -> PassRows:
        """These rows of one token each, then copies of the first up to `tokens` (a decode step padded to its
        batch bucket repeats its first row: the copies must compute what it computes)."""
        extra = tokens - len(self.token_keys)
        if extra <= 0:
            return self
        return PassRows.of(self.token_keys + (self.token_keys[0],) * extra, [1] * tokens, self.device)


class RowPlan:
    """The rows of the pass in progress (`PassRows`; None outside a pass). Passes of at most `stacked_tokens`
    tokens take the stacked product, longer ones the grouped one (see the module docstring).

    The stacked product's masks live in buffers kept across passes, one per (layout, dtype, tokens), written in
    place when a pass starts (`rows`): a captured decode step reads them by address, and a replay, which runs
    no Python, finds the masks of its own pass there. `version` counts changes of the layers' stacks (an
    adapter put on or dropped): a captured step is stale once it moved."""

    def __init__(self, stacked_tokens: int = 64) -> None:
        self.current: PassRows | None = None
        self.stacked_tokens = stacked_tokens
        self.version = 0
        self._masks: dict[tuple, Tensor] = {}  # (layout, dtype, tokens) -> [tokens, R] on the device

    @property
    def groups(self) -> Groups:
        return self.current.groups if self.current is not None else ()

    @contextlib.contextmanager
    def rows(self, rows: PassRows) -> Iterator[None]:
        """`rows` for the passes inside (one pass, usually); the kept masks of its token count rewritten."""
        outer, self.current = self.current, rows
        for layout, dtype, n in [k for k in self._masks if k[2] == len(rows.token_keys)]:
            self._masks[layout, dtype, n].copy_(self._host_mask(layout, dtype), non_blocking=True)
        try:
            yield
        finally:
            self.current = outer

    @staticmethod
    def from_rows(keys: Sequence[str | None], lengths: Sequence[int], device: torch.device | str) -> PassRows:
        return PassRows.of(keys, lengths, device)

    def mask(self, layout: tuple[tuple[str, int], ...], dtype: torch.dtype) -> Tensor:
        """[tokens, R] of this pass for a stack laid out as ((key, rank), ...): 1 in each token's own adapter's
        columns. One buffer per layout and token count (layers with the same adapters share it), kept."""
        assert self.current is not None
        key = (layout, dtype, len(self.current.token_keys))
        found = self._masks.get(key)
        if found is None:
            found = self._masks[key] = self._host_mask(layout, dtype).to(self.current.device)
        return found

    def _host_mask(self, layout: tuple[tuple[str, int], ...], dtype: torch.dtype) -> Tensor:
        assert self.current is not None
        index = {key: i for i, (key, _) in enumerate(layout)}
        starts = torch.tensor([0] + [r for _, r in layout]).cumsum(0).tolist()
        host = torch.zeros(len(self.current.token_keys), starts[-1], dtype=dtype)
        for t, key in enumerate(self.current.token_keys):
            if key in index:
                host[t, starts[index[key]]:starts[index[key] + 1]] = 1
        return host.pin_memory() if self.current.device.type == "cuda" else host


class LayerAdapters:
    """One linear layer's adapters on the device (key -> `LoRAPair`, changed through `put`/`drop`), their stack
    (made when first needed after a change), and the decoder's shared `RowPlan`."""

    def __init__(self, plan: RowPlan) -> None:
        self.plan = plan
        self.pairs: dict[str, LoRAPair] = {}
        self._stack: Stack | None = None

    def put(self, key: str, pair: LoRAPair) -> None:
        self.pairs[key] = pair
        self._stack = None
        self.plan.version += 1

    def drop(self, key: str) -> None:
        if self.pairs.pop(key, None) is not None:
            self._stack = None
            self.plan.version += 1

    @property
    def active(self) -> bool:
        """Whether the pass in progress has rows on adapters."""
        return bool(self.plan.groups)

    def stack(self) -> Stack:
        if self._stack is None:
            self._stack = Stack.of(self.pairs)
        return self._stack

    def add_to(self, y: Tensor, x: Tensor) -> Tensor:
        """y (the base output for input x) plus each row's adapter update, in place; y returned."""
        y2, x2 = y.reshape(-1, y.shape[-1]), x.reshape(-1, x.shape[-1])
        rows = self.plan.current
        if rows is None or not self.pairs:
            return y
        if x2.shape[0] <= self.plan.stacked_tokens:
            stack = self.stack()
            stacked_lora(y2, x2, stack, self.plan.mask(stack.layout, x2.dtype))
        else:
            segmented_lora(y2, x2, self.pairs, rows.groups)
        return y


@dataclass(frozen=True)
class Stack:
    """Every adapter of one layer side by side: A_all [R, in], s B_all [out, R]; `layout` ((key, rank), ...)."""

    a: Tensor
    b: Tensor
    layout: tuple[tuple[str, int], ...]

    @classmethod
    def of(cls, pairs: Mapping[str, LoRAPair]) -> Stack:
        keys = list(pairs)
        return cls(torch.cat([pairs[k].a for k in keys]).contiguous(),
                   torch.cat([pairs[k].b for k in keys], dim=1).contiguous(),
                   tuple((k, int(pairs[k].a.shape[0])) for k in keys))


def stacked_lora(y: Tensor, x: Tensor, stack: Stack, mask: Tensor) -> Tensor:
    """y [N, out] += ((x A_all^T) * mask) B_all^T, in place; y returned. `mask` [N, R] keeps each token's own
    adapter's columns (`RowPlan.mask`)."""
    return y.addmm_((x @ stack.a.t()) * mask, stack.b.t())


def segmented_lora(y: Tensor, x: Tensor, pairs: Mapping[str, LoRAPair], groups: Groups) -> Tensor:
    """y [N, out] += the update of each group's adapter on its tokens of x [N, in], in place; y returned.

    A group whose key the layer has no adapter for (the adapter leaves this layer out) adds nothing."""
    for key, index in groups:
        pair = pairs.get(key)
        if pair is None:
            continue
        if index is None:  # every token on this adapter
            y.addmm_(x @ pair.a.t(), pair.b.t())
        elif index.numel():
            y.index_add_(0, index, (x.index_select(0, index) @ pair.a.t()) @ pair.b.t())
    return y


def reference_segmented_lora(y: Tensor, x: Tensor, pairs: Mapping[str, LoRAPair],
                             token_keys: Sequence[str | None]) -> Tensor:
    """Plain PyTorch, token by token: y[i] + (x[i] A^T) (s B)^T with token i's adapter (None: y[i] itself)."""
    rows = []
    for i, key in enumerate(token_keys):
        pair = pairs.get(key) if key is not None else None
        rows.append(y[i] if pair is None else y[i] + (x[i] @ pair.a.t()) @ pair.b.t())
    return torch.stack(rows)
