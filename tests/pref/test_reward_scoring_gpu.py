"""Reward scoring on a GPU: a 4-bit bf16 reward model and a 4-bit bf16 DPO policy, trained on the GPU, score their
held-out pairs in `loratune eval` (reward task) with the accuracy their training's last evaluation measured, and
`POST /v1/rewards` serves the reward model's scores (the same pairwise accuracy).

Run on the GPU machine: `python -m pytest tests/pref/test_reward_scoring_gpu.py -q -m gpu`. Skipped without CUDA.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from train_helpers import config, write_run_yaml

from loratune.data.preference import read_pair
from loratune.data.readers import iter_file
from loratune.eval.config import load_eval_config
from loratune.eval.run import run_eval
from loratune.train.metrics import read_rows
from loratune.train.run import train

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

PAIRS = Path(__file__).parents[2] / "examples" / "data" / "preference.jsonl"


def _train(tmp_path: Path, tiny_llama: Path, method: str) -> tuple[Path, dict, Path]:
    """A 4-bit bf16 run of `method` on the first 32 pairs, evaluated on the last 8 at its last step."""
    lines = PAIRS.read_text().splitlines(keepends=True)
    train_file, held = tmp_path / "train.jsonl", tmp_path / "heldout.jsonl"
    train_file.write_text("".join(lines[:32]))
    held.write_text("".join(lines[32:]))
    path = write_run_yaml(tmp_path, tiny_llama, data={"datasets": [{"path": str(train_file)}],
                                                      "eval_datasets": [{"path": str(held)}], "eval_split": 0},
                          quantization={"bits": 4, "compute_dtype": "bf16"},
                          train={"method": method, "optimizer": "adamw", "lr": 5e-3, "max_steps": 8, "eval_every": 8,
                                 "save_every": 0})
    out = train(config(path)).out_dir
    return out, [r for r in read_rows(out / "metrics.jsonl") if "eval_loss" in r][-1], held


@pytest.mark.parametrize("method", ["rm", "dpo"])
def test_eval_scores_what_training_measured_on_the_gpu(tmp_path: Path, tiny_llama: Path, method: str) -> None:
    run, last, held = _train(tmp_path, tiny_llama, method)
    cfg = tmp_path / "eval.yaml"
    cfg.write_text(json.dumps({"reward": [{"name": "heldout", "path": str(held), "models": [{"name": "m", "path": str(run)}]}],
                               "output": {"dir": str(tmp_path / "eval"), "plots": False}}))
    got = run_eval(load_eval_config(cfg))["reward"]["heldout"]["models"]["m"]
    assert got["pairs"] == 8
    # bf16: the eval's padded batches and training's padding-free ones round differently; pairs this close may flip
    near = sum(abs(e["margin"]) < 0.05 for kind in ("right", "wrong") for e in got["examples"][kind])
    assert abs(got["accuracy"]["value"] - last["eval_accuracy"]) <= near / 8
    assert got["margin"]["value"] == pytest.approx(last["eval_margin"], abs=0.05)


def test_serve_scores_on_the_gpu(tmp_path: Path, tiny_llama: Path) -> None:
    from starlette.testclient import TestClient

    from loratune.infer.load import load_engine
    from loratune.infer.reward_api import load_reward_models
    from loratune.infer.server import create_app

    run, last, held = _train(tmp_path, tiny_llama, "rm")
    pairs = [read_pair(r, None, None) for r in iter_file(held)]
    conversations = [c for p in pairs for c in (p.prompt + [p.chosen], p.prompt + [p.rejected])]
    app = create_app(load_engine([str(run)], implementation=None), rewards=load_reward_models([f"rm={run}"]))
    with TestClient(app) as client:
        r = client.post("/v1/rewards", json={"model": "rm", "messages": conversations})
    assert r.status_code == 200, r.text
    scores = [d["score"] for d in r.json()["data"]]
    margins = [c - x for c, x in zip(scores[0::2], scores[1::2])]
    near = sum(abs(m) < 0.05 for m in margins)
    assert abs(sum(m > 0 for m in margins) / 8 - last["eval_accuracy"]) <= near / 8
    assert sum(margins) / 8 == pytest.approx(last["eval_margin"], abs=0.05)
