"""`Sample`: one training sequence, the unit every later stage (packing, batching, the loop) works on."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Sample:
    """Token ids and labels of one sequence (a sample, or a packed row of several).

    `labels` has the length of `input_ids`, -100 where no loss is taken, and is NOT shifted: the loss
    shifts. `position_ids` is set for packed rows and restarts at 0 at each packed sample, which is how
    transformers keeps attention inside each sample.
    """

    input_ids: list[int]
    labels: list[int]
    position_ids: list[int] | None = None

    def __len__(self) -> int:
        return len(self.input_ids)
