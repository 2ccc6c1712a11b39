"""Batches: padding-free streams or padded rows, and a deterministic order of micro-batches for each epoch.

`collate_stream` lays samples end to end in one row [1, N] with `position_ids` restarting at 0 at every
sample (and at every sample inside a packed row): the sequence boundaries, from which loratune's decoder
builds its `Boundaries` (cu_seqlens) and transformers its block-diagonal mask. The first label of every
sample is -100, so no position is trained to predict the first token of the next sample. No attention
mask: transformers only derives the per-sample mask from `position_ids` when the attention mask is None.
Optional padding at the end (to a fixed stream length, so that the shape repeats) is a segment of its own
with positions restarting at 0 and no labels.

`collate` pads on the right and masks padding by *position* (labels -100 past each sequence's end),
never by token id, because pad may equal eos and eos must stay supervised. Unpacked batches carry an
`attention_mask`. Packed batches carry `position_ids` and deliberately no `attention_mask`, as above.
Padding in a packed batch gets positions restarting at 0, so it forms a segment of its own.

`Batching` turns the samples of one optimizer step (a window of `batch_order`'s micro-batches) into the
micro-batches the model sees: padded, one per index list as ordered; or padding-free, the window's samples
regrouped best-fit-decreasing into streams of at most `tokens` tokens (`loratune.data.packing.fill`). The
step's samples, hence its token-normalised loss and gradient, are the same either way.

`batch_order` is a pure function of (seed, epoch), so the loop can resume at any micro-batch. With
`group_by_length`, samples are shuffled, sorted by length inside mega-batches of 64 micro-batches, and
the batches shuffled, with the one holding the longest sample first so an out-of-memory shows at once.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from loratune.data.packing import fill
from loratune.data.render import IGNORE
from loratune.data.sample import Sample

MEGA = 64


def segments(sample: Sample) -> list[int]:
    """Lengths of the samples inside `sample`: one, or one per restart of a packed row's positions at 0."""
    if sample.position_ids is None:
        return [len(sample.input_ids)]
    starts = [i for i, p in enumerate(sample.position_ids) if p == 0] or [0]
    if starts[0] != 0:
        starts.insert(0, 0)
    return [b - a for a, b in zip(starts, starts[1:] + [len(sample.input_ids)])]


def segment_lengths(position_ids: torch.Tensor) -> list[int]:
    """Lengths of the segments of a [1, N] (or [N]) stream: a new one wherever the positions restart at 0."""
    pos = position_ids.reshape(-1)
    starts = (pos == 0).nonzero().reshape(-1).tolist()
    if not starts or starts[0] != 0:
        starts.insert(0, 0)
    return [b - a for a, b in zip(starts, starts[1:] + [pos.numel()])]


def collate_stream(samples: list[Sample], pad_id: int, pad_to: int | None = None) -> dict[str, torch.Tensor]:
    """The samples end to end as one row: input_ids, labels and position_ids, each [1, N] (N = `pad_to` if given)."""
    ids: list[int] = []
    labels: list[int] = []
    positions: list[int] = []
    for s in samples:
        start = len(ids)
        ids += s.input_ids
        labels += s.labels
        for n in segments(s):  # the first token of every sample is nobody's target
            labels[start] = IGNORE
            positions += range(n)
            start += n
    if pad_to is not None:
        if pad_to < len(ids):
            raise ValueError(f"the stream holds {len(ids)} tokens, more than the {pad_to} it is padded to")
        extra = pad_to - len(ids)
        ids += [pad_id] * extra
        labels += [IGNORE] * extra
        positions += range(extra)
    as_row = lambda v: torch.tensor(v, dtype=torch.long)[None]  # noqa: E731
    return {"input_ids": as_row(ids), "labels": as_row(labels), "position_ids": as_row(positions)}


def collate(samples: list[Sample], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded tensors: input_ids, labels, and attention_mask (unpacked) or position_ids (packed)."""
    width = max(len(s.input_ids) for s in samples)
    n = len(samples)
    ids = torch.full((n, width), pad_id, dtype=torch.long)
    labels = torch.full((n, width), IGNORE, dtype=torch.long)
    mask = torch.zeros((n, width), dtype=torch.long)
    packed = any(s.position_ids is not None for s in samples)
    positions = torch.zeros((n, width), dtype=torch.long)
    for i, s in enumerate(samples):
        k = len(s.input_ids)
        ids[i, :k] = torch.tensor(s.input_ids, dtype=torch.long)
        labels[i, :k] = torch.tensor(s.labels, dtype=torch.long)
        mask[i, :k] = 1
        if packed:
            pos = s.position_ids if s.position_ids is not None else range(k)
            positions[i, :k] = torch.tensor(list(pos), dtype=torch.long)
            positions[i, k:] = torch.arange(width - k)
    if packed:
        return {"input_ids": ids, "labels": labels, "position_ids": positions}
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def batch_order(samples: list[Sample], batch_size: int, seed: int, epoch: int, group_by_length: bool) -> list[list[int]]:
    """Micro-batches of sample indices for one epoch; every index exactly once, the last batch may be short."""
    rng = random.Random(f"loratune:{seed}:{epoch}")
    order = list(range(len(samples)))
    rng.shuffle(order)
    if not group_by_length:
        return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    batches = []
    step = batch_size * MEGA
    for m in range(0, len(order), step):
        mega = sorted(order[m:m + step], key=lambda i: -len(samples[i].input_ids))
        batches += [mega[i:i + batch_size] for i in range(0, len(mega), batch_size)]
    rng.shuffle(batches)
    longest = max(range(len(batches)), key=lambda b: max(len(samples[i].input_ids) for i in batches[b]), default=0)
    if batches:
        batches.insert(0, batches.pop(longest))
    return batches


@dataclass(frozen=True)
class Batching:
    """How samples become micro-batches: padded rows (`padding_free` False) or padding-free streams.

    `batch_size`: samples per padded micro-batch (and per evaluation batch). `tokens`: the padding-free token
    budget of one micro-batch (at least the longest sample). `pad_to_budget`: pad every stream to exactly
    `tokens` (one shape for every micro-batch)."""

    padding_free: bool
    batch_size: int
    tokens: int
    pad_id: int
    pad_to_budget: bool = False

    def collate(self, samples: list[Sample]) -> dict[str, torch.Tensor]:
        if self.padding_free:
            return collate_stream(samples, self.pad_id, self.tokens if self.pad_to_budget else None)
        return collate(samples, self.pad_id)

    def groups(self, samples: list[Sample], indices: list[int]) -> list[list[int]]:
        """`indices` (one step's, or all evaluation samples) regrouped into padding-free micro-batches."""
        bins = fill([len(samples[i].input_ids) for i in indices], self.tokens)
        return [[indices[j] for j in b] for b in bins]

    def micro_batches(self, samples: list[Sample], window: list[list[int]]) -> list[dict[str, torch.Tensor]]:
        """The micro-batches of one optimizer step whose samples `window` lists (batch_order's lists)."""
        if not self.padding_free:
            return [collate([samples[i] for i in idx], self.pad_id) for idx in window]
        step = [i for idx in window for i in idx]
        return [self.collate([samples[i] for i in g]) for g in self.groups(samples, step)]

    def eval_batches(self, samples: list[Sample]) -> Iterator[dict[str, torch.Tensor]]:
        """Every sample once, in a fixed order."""
        if not self.padding_free:
            for i in range(0, len(samples), self.batch_size):
                yield collate(samples[i:i + self.batch_size], self.pad_id)
            return
        for g in self.groups(samples, list(range(len(samples)))):
            yield self.collate([samples[i] for i in g])
