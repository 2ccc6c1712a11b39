"""Fixtures of the multi-process tests: the training tests' helpers (tests/train) are importable here."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parents[1] / "train"))


@pytest.fixture(autouse=True)
def _one_thread(one_thread) -> None:
    """One CPU thread, as the child processes get: bit-identical comparisons need equal thread counts."""
