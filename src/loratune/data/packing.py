"""Packing: several samples in one row of up to `max_length` tokens, without attention across them.

Rows are filled best-fit-decreasing (`fill`: each sample, longest first, goes into the fullest row it still
fits in), which wastes little space and is deterministic; the padding-free micro-batches of the training loop
are filled the same way (`loratune.data.collate.Batching`). Each row carries `position_ids` that restart at 0
at every sample; with no attention mask, transformers 5 derives a block-diagonal causal mask from them
(`masking_utils.find_packed_sequence_indices`; flash-attention uses them as varlen boundaries), so no
token attends into another sample, and each sample sees the positions it would see alone. A sample's
first label is always -100 (see `loratune.data.render`), so no sample is trained to predict the first
token of the next one.
"""

from __future__ import annotations

import bisect

from loratune.data.sample import Sample


def fill(lengths: list[int], capacity: int) -> list[list[int]]:
    """Indices of `lengths` grouped into bins of at most `capacity` tokens, best-fit-decreasing.

    Each length, longest first (ties in index order), goes into the fullest bin it still fits in. Bins are
    returned in the order they were opened, each with its indices in ascending order: a pure function of
    the lengths, so a resumed run regroups a window exactly as the uninterrupted one did.
    """
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    bins: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (space left, bin index), kept sorted
    for i in order:
        n = lengths[i]
        if n > capacity:
            raise ValueError(f"item {i} has {n} tokens, more than the capacity {capacity}")
        k = bisect.bisect_left(free, (n, -1))
        if k < len(free):
            space, b = free.pop(k)
        else:
            space, b = capacity, len(bins)
            bins.append([])
        bins[b].append(i)
        if space - n > 0:
            bisect.insort(free, (space - n, b))
    return [sorted(members) for members in bins]


def pack(samples: list[tuple[list[int], list[int]]], max_length: int) -> list[Sample]:
    """Pack (ids, labels) pairs, each at most `max_length` long, into rows; every token kept exactly once."""
    for i, (ids, _) in enumerate(samples):
        if len(ids) > max_length:
            raise ValueError(f"sample {i} has {len(ids)} tokens, more than max_length {max_length}")
    rows = fill([len(ids) for ids, _ in samples], max_length)
    return [_row([samples[i] for i in _longest_first(members, samples)]) for members in rows]


def _longest_first(members: list[int], samples: list[tuple[list[int], list[int]]]) -> list[int]:
    """A row's samples in the order best-fit placed them (longest first), as rows were always laid out."""
    return sorted(members, key=lambda i: (-len(samples[i][0]), i))


def _row(members: list[tuple[list[int], list[int]]]) -> Sample:
    ids: list[int] = []
    labels: list[int] = []
    positions: list[int] = []
    for m_ids, m_labels in members:
        ids += m_ids
        labels += m_labels
        positions += range(len(m_ids))
    return Sample(ids, labels, positions)


def efficiency(rows: list[Sample], max_length: int) -> float:
    """Fraction of the row slots (rows x max_length) that hold real tokens."""
    return sum(len(r) for r in rows) / max(len(rows) * max_length, 1)
