"""Micro-batches of preference samples: the loop's `Batching`, plus each sample's KTO label.

A `PreferenceSample` is already two sequences with their boundary (positions restart at 0), so the SFT batching
lays pairs out as it lays out packed rows: padded rows, or padding-free streams whose budget counts both sides.
The only addition is `desirable` ([samples], bool, in the order the samples are laid out), which KTO reads.
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
