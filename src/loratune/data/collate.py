"""Batches: padding by position, and a deterministic order of micro-batches for each epoch.

`collate` pads on the right and masks padding by *position* (labels -100 past each sequence's end),
never by token id, because pad may equal eos and eos must stay supervised. Unpacked batches carry an
`attention_mask`. Packed batches carry `position_ids` and deliberately no `attention_mask`: transformers
only derives the per-sample (block-diagonal) mask from `position_ids` when the attention mask is None.
Padding in a packed batch gets positions restarting at 0, so it forms a segment of its own.

`batch_order` is a pure function of (seed, epoch), so the loop can resume at any micro-batch. With
`group_by_length`, samples are shuffled, sorted by length inside mega-batches of 64 micro-batches, and
the batches shuffled, with the one holding the longest sample first so an out-of-memory shows at once.
"""

from __future__ import annotations

import random

import torch

from loratune.data.render import IGNORE
from loratune.data.sample import Sample

MEGA = 64


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
