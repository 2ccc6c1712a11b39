"""Fixtures for the eval tests: the small MMLU-format benchmark of `mmlu_files`, written once per session, and one
CPU thread per test."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from mmlu_files import write_jsonl, write_mmlu  # noqa: E402


@pytest.fixture(scope="session")
def mmlu_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_mmlu(tmp_path_factory.mktemp("mmlu"))


@pytest.fixture(scope="session")
def mmlu_jsonl(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Path]]:
    return write_jsonl(tmp_path_factory.mktemp("mmlu-jsonl"))


@pytest.fixture(autouse=True)
def _one_thread(one_thread) -> None:
    """One CPU thread, as tests/train runs: the tiny models' many small products run much faster without thread
    hand-offs on a busy machine (a decoder scoring test: 30 s on 2 threads under load, 2 s on one)."""
