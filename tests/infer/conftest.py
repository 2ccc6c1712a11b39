"""Fixtures for inference tests: adapter folders as `loratune train` writes them, and a loaded engine."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from run_folder import make_adapter_dir  # noqa: E402


@pytest.fixture(scope="session")
def adapter_a(tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_adapter_dir(tiny_llama, tmp_path_factory.mktemp("runs") / "alpha", seed=1)


@pytest.fixture(scope="session")
def adapter_b(tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_adapter_dir(tiny_llama, tmp_path_factory.mktemp("runs") / "beta", seed=2)


@pytest.fixture(scope="session")
def adapter_4bit(tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_adapter_dir(tiny_llama, tmp_path_factory.mktemp("runs") / "q4", bits=4, seed=3)


@pytest.fixture(scope="session")
def adapter_8bit(tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_adapter_dir(tiny_llama, tmp_path_factory.mktemp("runs") / "q8", bits=8, seed=4)


@pytest.fixture(scope="session")
def engine(adapter_a: Path, adapter_b: Path):
    """The tiny Llama base (fp32 on CPU) serving `base`, `alpha` and `beta` (on loratune's decoder, the default)."""
    from loratune.infer.load import load_engine

    return load_engine([str(adapter_a), str(adapter_b)], implementation=None)


@pytest.fixture(scope="session")
def hf_engine(adapter_a: Path, adapter_b: Path):
    """The same three models on the transformers + peft path (the fallback, and the reference)."""
    from loratune.infer.load import load_engine

    return load_engine([str(adapter_a), str(adapter_b)], implementation="transformers")
