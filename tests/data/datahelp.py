"""Helpers shared by the data tests (plain functions and constants; fixtures live in conftest.py)."""

from __future__ import annotations

from pathlib import Path

from loratune.config import DataConfig, DatasetConfig


def data_cfg(*paths: Path | str, **kw) -> DataConfig:
    """A DataConfig over `paths` (strings or DatasetConfig kwargs dicts), cache off unless asked."""
    datasets = [DatasetConfig(**p) if isinstance(p, dict) else DatasetConfig(path=str(p)) for p in paths]
    kw.setdefault("cache", False)
    return DataConfig(datasets=datasets, **kw)


CHAT = [{"messages": [{"role": "user", "content": f"Question {i}: what is {i} plus {i}?"},
                      {"role": "assistant", "content": f"It is {2 * i}."}]} for i in range(20)]
