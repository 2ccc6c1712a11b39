"""Micro-batches of preference samples: the loop's `Batching`, plus each sample's KTO label.

A `PreferenceSample` is already two sequences with their boundary (positions restart at 0), so the SFT batching
lays pairs out as it lays out packed rows: padded rows, or padding-free streams whose budget counts both sides.
The additions are `desirable` ([samples], bool, in the order the samples are laid out), which KTO reads, and
`ref_logps` ([2 x samples], the sequences' precomputed reference log-probs in layout order) where every sample
of the batch has them (preference.reference precomputed, `loratune.pref.reference`).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

from loratune.data.collate import Batching
from loratune.data.sample import Sample


@dataclass(frozen=True)
class PreferenceBatching(Batching):
    def collate(self, samples: list[Sample]) -> dict[str, torch.Tensor]:
        batch = super().collate(samples)
        batch["desirable"] = torch.tensor([bool(getattr(s, "desirable", None)) for s in samples], dtype=torch.bool)
        refs = [getattr(s, "ref", None) for s in samples]
        if refs and all(r is not None for r in refs):  # precomputed reference log-probs, in sequence order
            batch["ref_logps"] = torch.tensor([x for r in refs for x in r], dtype=torch.float64)
        return batch

    def micro_batches(self, samples: list[Sample], window: list[list[int]]) -> list[dict[str, torch.Tensor]]:
        if not self.padding_free:
            return [self.collate([samples[i] for i in idx]) for idx in window]
        return super().micro_batches(samples, window)

    def eval_batches(self, samples: list[Sample]) -> Iterator[dict[str, torch.Tensor]]:
        if not self.padding_free:
            for i in range(0, len(samples), self.batch_size):
                yield self.collate(samples[i:i + self.batch_size])
            return
        yield from super().eval_batches(samples)
