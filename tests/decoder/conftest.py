"""Fixtures of tests/decoder: the tiny family checkpoints of `decoder_families`, written once per session."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
from decoder_families import write_checkpoint


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory: pytest.TempPathFactory):
    """checkpoint(name) -> folder of that family's tiny random checkpoint (written once per session)."""
    root = tmp_path_factory.mktemp("decoder-families")
    built: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in built:
            built[name] = write_checkpoint(name, root / name)
        return built[name]

    return get


@pytest.fixture
def quiet():
    """transformers' and FlexAttention's notices about tiny random configs are not what these tests check."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield
