"""Rows of one batch on different LoRA adapters (or on the bare base): the base product once, a segmented update.

Serving several adapters by switching the one on the model (`QLoRALinear.set_adapter_state`) makes a batch
answer as one adapter: requests for another wait until it drains. Here every row of a forward pass names
its adapter, and each linear layer computes

    y = x W^T + b                                   once, for every token of the stream
    y[rows_k] += (x[rows_k] A_k^T) (s_k B_k)^T      for each adapter k present in the pass

where rows_k are the tokens of the rows on adapter k (tokens of base rows get no update). The number of
small products is the number of distinct adapters in the pass, not the number of rows; the base product,
the expensive part (the 4-bit weight read and dequantized), is shared. The A and scaled B of each adapter
are kept in the layer's compute dtype (`LoRAPair`), made once when the adapter is put on the device, so a
pass casts nothing.

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


class RowPlan:
    """The tokens of the pass in progress on each adapter: ((key, token indices [n] on the device, or None for
    every token), ...). Tokens of no group (base rows) get no update. Empty outside a pass."""

    def __init__(self) -> None:
        self.groups: Groups = ()

    @contextlib.contextmanager
    def rows(self, groups: Groups) -> Iterator[None]:
        """`groups` for the passes inside (one pass, usually)."""
        outer, self.groups = self.groups, tuple(groups)
        try:
            yield
        finally:
            self.groups = outer

    @staticmethod
    def from_rows(keys: Sequence[str | None], lengths: Sequence[int], device: torch.device | str) -> Groups:
        """Groups of a stream of rows laid end to end: row i has `lengths[i]` tokens and uses adapter `keys[i]`
        (None: the base). One group covering every token is given as (key, None): no gather, no scatter."""
        where: dict[str, list[int]] = {}
        start = 0
        for key, n in zip(keys, lengths):
            if key is not None:
                where.setdefault(key, []).extend(range(start, start + n))
            start += n
        if len(where) == 1 and len(next(iter(where.values()))) == start:
            return ((next(iter(where)), None),)
        return tuple((key, torch.tensor(idx, dtype=torch.long, device=device)) for key, idx in where.items())


class LayerAdapters:
    """One linear layer's adapters on the device (key -> `LoRAPair`) and the decoder's shared `RowPlan`."""

    def __init__(self, plan: RowPlan) -> None:
        self.plan = plan
        self.pairs: dict[str, LoRAPair] = {}

    @property
    def active(self) -> bool:
        """Whether the pass in progress has rows on adapters."""
        return bool(self.plan.groups)

    def add_to(self, y: Tensor, x: Tensor) -> Tensor:
        """y (the base output for input x) plus each row's adapter update, in place; y returned."""
        shape = y.shape
        segmented_lora(y.reshape(-1, shape[-1]), x.reshape(-1, x.shape[-1]), self.pairs, self.plan.groups)
        return y


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
