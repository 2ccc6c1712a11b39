"""Fixtures of the training tests (helpers live in train_helpers.py)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from train_helpers import write_run_yaml  # noqa: E402


@pytest.fixture
def run_yaml(tmp_path: Path, tiny_llama: Path) -> Path:
    """The base run as a YAML file, writing to tmp_path/out."""
    return write_run_yaml(tmp_path, tiny_llama)


@pytest.fixture(autouse=True)
def _one_thread(one_thread) -> None:
    """One CPU thread, as the subprocesses get (OMP_NUM_THREADS=1): tiny matmuls run many times faster
    without thread hand-offs on a busy machine, and bit-identical comparisons need equal thread counts."""
