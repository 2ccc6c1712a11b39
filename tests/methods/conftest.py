"""Fixtures of the method tests (NEFTune, adapter initialisation, freeze-tuning, new tokens, trackers)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parents[1] / "train"))


@pytest.fixture(autouse=True)
def _one_thread(one_thread) -> None:
    """One CPU thread: the tiny models run faster without hand-offs on a shared machine."""
