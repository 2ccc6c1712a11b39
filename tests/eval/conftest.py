"""Fixtures for the eval tests: the small MMLU-format benchmark of `mmlu_files`, written once per session."""

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
