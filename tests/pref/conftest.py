"""Fixtures of the preference tests: the training tests' helpers (tests/train/train_helpers.py) and one thread."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parents[1] / "train"))


@pytest.fixture(autouse=True)
def _one_thread(one_thread) -> None:
    """One CPU thread, as the training subprocesses get: bit-identical comparisons need equal thread counts."""


PAIRS = Path(__file__).parents[2] / "examples" / "data" / "preference.jsonl"


@pytest.fixture(scope="session")
def reward_run(tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A reward model (train.method rm) trained 8 steps on the first 32 example pairs; (its run folder, the 8
    held-out pairs). Its eval accuracy on them is at least 0.75 (tests/pref/test_reward_model.py)."""
    from train_helpers import config, write_run_yaml

    from loratune.train.run import train

    tmp = tmp_path_factory.mktemp("reward-run")
    lines = PAIRS.read_text().splitlines(keepends=True)
    train_file, held = tmp / "train.jsonl", tmp / "heldout.jsonl"
    train_file.write_text("".join(lines[:32]))
    held.write_text("".join(lines[32:]))
    path = write_run_yaml(tmp, tiny_llama, data={"datasets": [{"path": str(train_file)}], "eval_split": 0},
                          train={"method": "rm", "optimizer": "adamw", "lr": 5e-3, "max_steps": 8, "save_every": 0})
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return train(config(path)).out_dir, held
    finally:
        torch.set_num_threads(before)
