"""Reward models (train.method rm): a scalar head on the base + LoRA trained with the pairwise loss, saved beside the
adapter (checkpoints too), reloaded to score exactly what training measured (`loratune reward`), and resumed
bit-identically after kill -9."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest
from safetensors.torch import load_file
from train_helpers import adapter_bytes, config, run_cli, write_run_yaml

from loratune.cli import main
from loratune.errors import ModelError
from loratune.pref.reward import HEAD_FILE, pairwise_accuracy
from loratune.train.metrics import read_rows
from loratune.train.run import train

PAIRS = Path(__file__).parents[2] / "examples" / "data" / "preference.jsonl"


@pytest.fixture
def split(tmp_path: Path) -> tuple[Path, Path]:
    lines = PAIRS.read_text().splitlines(keepends=True)
    train_file, eval_file = tmp_path / "train.jsonl", tmp_path / "eval.jsonl"
    train_file.write_text("".join(lines[:32]))
    eval_file.write_text("".join(lines[32:]))
    return train_file, eval_file


def _sections(train_file: Path, eval_file: Path, **train_options: object) -> dict:
    return {"data": {"datasets": [{"path": str(train_file)}], "eval_datasets": [{"path": str(eval_file)}], "eval_split": 0},
            "train": {"method": "rm", "optimizer": "adamw", "lr": 5e-3, **train_options}}


def test_reward_model_trains_saves_and_scores_as_trained(tmp_path: Path, tiny_llama: Path, split, capsys) -> None:
    train_file, eval_file = split
    path = write_run_yaml(tmp_path, tiny_llama, **_sections(train_file, eval_file, max_steps=8, eval_every=4,
                                                            save_every=4))
    result = train(config(path))
    evals = [r for r in read_rows(result.out_dir / "metrics.jsonl") if "eval_loss" in r]
    assert [r["step"] for r in evals] == [4, 8]
    assert evals[-1]["eval_loss"] < evals[0]["eval_loss"] < 0.6931  # log 2: a head that cannot tell the answers
    assert evals[-1]["eval_accuracy"] >= 0.75 and evals[-1]["eval_margin"] > 0
    head = load_file(str(result.out_dir / HEAD_FILE))["score.weight"]
    assert head.shape == (1, 64) and float(head.abs().max()) > 0
    assert (result.out_dir / "checkpoints" / "step-00000008" / HEAD_FILE).is_file()
    # reloaded from the output folder, it scores the eval pairs exactly as the last evaluation did
    scored = pairwise_accuracy(result.out_dir, str(eval_file))
    assert scored["pairs"] == 8
    assert scored["accuracy"] == evals[-1]["eval_accuracy"]
    assert scored["margin"] == pytest.approx(evals[-1]["eval_margin"], abs=1e-5)
    assert scored["loss"] == pytest.approx(evals[-1]["eval_loss"], abs=1e-5)
    assert main(["reward", str(result.out_dir), str(eval_file)]) == 0
    assert f"pairwise accuracy {scored['accuracy']:.4f} on 8 pairs" in capsys.readouterr().out
    with pytest.raises(ModelError, match="not a reward model"):
        pairwise_accuracy(tmp_path, str(eval_file))


@pytest.mark.slow
def test_killed_reward_model_run_resumes_to_the_same_head(tmp_path: Path, tiny_llama: Path, split) -> None:
    train_file, eval_file = split
    sections = _sections(train_file, eval_file, max_steps=6, save_every=2, eval_every=3)
    ref = tmp_path / "ref"
    ref.mkdir()
    want = train(config(write_run_yaml(ref, tiny_llama, **sections)))
    path = write_run_yaml(tmp_path, tiny_llama, **sections)
    for fault in ("kill@step.backward#3", "kill@save.files#1"):
        assert run_cli(path, fault=fault).returncode == -signal.SIGKILL
    done = run_cli(path)
    assert done.returncode == 0 and "resuming from" in done.stderr, done.stderr[-3000:]
    out = tmp_path / "out"
    assert adapter_bytes(out) == adapter_bytes(want.out_dir)
    assert (out / HEAD_FILE).read_bytes() == (want.out_dir / HEAD_FILE).read_bytes()
