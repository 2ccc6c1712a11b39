"""Fixtures for the data tests: the tiny families' tokenizers, loaded once, and a writer for data files."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest

from loratune.config import ModelConfig
from loratune.model.load import load_tokenizer


@pytest.fixture(scope="session")
def toks(tiny_models: dict[str, Path]) -> dict:
    """{family: (tokenizer, TokenizerInfo)} of the tiny models."""
    return {fam: load_tokenizer(ModelConfig(path=str(folder))) for fam, folder in tiny_models.items()}


@pytest.fixture
def write(tmp_path: Path) -> Callable[..., Path]:
    """write(name, rows) writes JSON Lines (a list of dicts) or raw text/bytes; returns the path."""

    def _write(name: str, content) -> Path:
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            path.write_bytes(content)
        elif isinstance(content, str):
            path.write_text(content, encoding="utf-8")
        else:
            path.write_text("".join(json.dumps(r) + "\n" for r in content), encoding="utf-8")
        return path

    return _write
