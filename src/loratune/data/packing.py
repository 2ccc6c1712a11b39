"""Packing: several samples in one row of up to `max_length` tokens, without attention across them.

Rows are filled best-fit-decreasing (each sample, longest first, goes into the fullest row it still fits
in), which wastes little space and is deterministic. Each row carries `position_ids` that restart at 0
at every sample; with no attention mask, transformers 5 derives a block-diagonal causal mask from them
(`masking_utils.find_packed_sequence_indices`; flash-attention uses them as varlen boundaries), so no
token attends into another sample, and each sample sees the positions it would see alone. A sample's
first label is always -100 (see `loratune.data.render`), so no sample is trained to predict the first
token of the next one.
"""

from __future__ import annotations

import bisect

from loratune.data.sample import Sample


def pack(samples: list[tuple[list[int], list[int]]], max_length: int) -> list[Sample]:
    """Pack (ids, labels) pairs, each at most `max_length` long, into rows; every token kept exactly once."""
    order = sorted(range(len(samples)), key=lambda i: (-len(samples[i][0]), i))
    rows: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (space left, row index), kept sorted
    for i in order:
        n = len(samples[i][0])
        if n > max_length:
            raise ValueError(f"sample {i} has {n} tokens, more than max_length {max_length}")
        k = bisect.bisect_left(free, (n, -1))
        if k < len(free):
            space, r = free.pop(k)
        else:
            space, r = max_length, len(rows)
            rows.append([])
        rows[r].append(i)
        if space - n > 0:
            bisect.insort(free, (space - n, r))
    return [_row([samples[i] for i in members]) for members in rows]


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
