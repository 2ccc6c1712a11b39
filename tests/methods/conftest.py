"""Fixtures of the method tests (NEFTune, adapter initialisation, freeze-tuning, new tokens, trackers)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parents[1] / "train"))


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    """One CPU thread: the tiny models run faster without hand-offs on a shared machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
