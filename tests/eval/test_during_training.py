"""train.eval_benchmark: accuracies scored during training equal what `loratune eval` computes for the same
adapter state, on both model codes (loratune's decoder and transformers + peft)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent.parent / "train"))
from train_helpers import config, write_run_yaml  # noqa: E402

from loratune.config import load_config  # noqa: E402
from loratune.errors import ConfigError, DataError  # noqa: E402
from loratune.eval.config import EvalConfig, EvalModelConfig, EvalOutputConfig, MCTaskConfig  # noqa: E402
from loratune.eval.run import run_eval  # noqa: E402
from loratune.train.metrics import read_rows  # noqa: E402
from loratune.train.run import train  # noqa: E402


def _eval_records(out: Path, model: str) -> list[dict]:
    (cache,) = (out / "cache" / model).glob("mmlu-*.jsonl")
    return [json.loads(line) for line in cache.read_text().splitlines() if line.strip()]


@pytest.mark.parametrize("implementation", ["loratune", pytest.param("transformers", marks=pytest.mark.slow)])
def test_training_scores_equal_loratune_eval(implementation: str, tiny_llama: Path, mmlu_dir: Path,
                                            tmp_path: Path) -> None:
    run = write_run_yaml(tmp_path, tiny_llama, model={"path": str(tiny_llama), "implementation": implementation},
                         train={"save_every": 4, "keep_last": 0, "plot": True, "lr": 3e-2,
                                "eval_benchmark": {"path": str(mmlu_dir), "name": "mmlu", "shots": 1, "every": 4}})
    result = train(config(run))
    out = result.out_dir
    rows = [r for r in read_rows(out / "metrics.jsonl") if "benchmark_acc" in r]
    assert [r["step"] for r in rows] == [0, 4, 8] and all(r["benchmark"] == "mmlu" and r["benchmark_n"] == 9
                                                          for r in rows)
    # `loratune eval` on the base, the step-4 checkpoint and the final adapter
    models = {0: str(tiny_llama), 4: str(out / "checkpoints" / "step-00000004"), 8: str(out)}
    assert Path(models[4]).is_dir(), sorted(p.name for p in (out / "checkpoints").iterdir())
    cfg = EvalConfig(models=[EvalModelConfig(name=f"s{k}", path=v, bits=4) for k, v in models.items()],
                     mc=[MCTaskConfig(name="mmlu", path=str(mmlu_dir), shots=1)],
                     output=EvalOutputConfig(dir=str(tmp_path / "eval"), plots=False))
    report = run_eval(cfg)
    for row in rows:
        name = f"s{row['step']}"
        got = report["mc"]["mmlu"]["models"][name]["metrics"]
        assert {k for k in row if k.startswith("benchmark_acc")} == {f"benchmark_{m}" for m in got}
        for metric in got:  # acc, acc_norm (acc_letter where every answer letter is one token)
            assert row[f"benchmark_{metric}"] == got[metric]["value"], (name, metric)
        records = _eval_records(tmp_path / "eval", name)
        answer_lp = float(np.mean([r["logprobs"][r["answer"]] for r in records]))
        assert row["benchmark_answer_logprob"] == pytest.approx(answer_lp, abs=1e-4)
    assert abs(rows[0]["benchmark_answer_logprob"] - rows[-1]["benchmark_answer_logprob"]) > 1e-3  # it trained
    facts = json.loads((out / "loratune_run.json").read_text())
    summary = facts["benchmark"]
    assert summary["first"]["step"] == 0 and summary["last"]["step"] == 8
    assert summary["last"]["acc"] == rows[-1]["benchmark_acc"]
    card = (out / "README.md").read_text()
    assert f"mmlu accuracy (n=9): {rows[0]['benchmark_acc']:.4f} at step 0 -> {rows[-1]['benchmark_acc']:.4f} at step 8" \
        in card
    assert (out / "loss.png").is_file()


def test_bad_benchmark_settings_fail_before_training(tiny_llama: Path, mmlu_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="train.eval_benchmark.shots"):
        load_config(None, [f"model.path={tiny_llama}", f"train.eval_benchmark.path={mmlu_dir}",
                           "train.eval_benchmark.shots=-1"])
    with pytest.raises(ConfigError, match="columns: unknown key 'questoin'"):
        load_config(None, [f"model.path={tiny_llama}", f"train.eval_benchmark.path={mmlu_dir}",
                           "train.eval_benchmark.columns.questoin=q"])
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"question": "Q?", "choices": ["a", "b"], "answer": "Z"}) + "\n")
    run = write_run_yaml(tmp_path, tiny_llama, train={"eval_benchmark": {"path": str(bad), "shots": 0}})
    with pytest.raises(DataError, match="bad.jsonl"):
        train(config(run))
    assert not (tmp_path / "out" / "metrics.jsonl").exists() or not read_rows(tmp_path / "out" / "metrics.jsonl")


@pytest.mark.slow
def test_a_continued_run_scores_as_the_uninterrupted_one(tiny_llama: Path, mmlu_dir: Path, tmp_path: Path) -> None:
    """Scoring consumes no randomness and is recorded once per step: 4 steps then continued to 8 gives the
    benchmark rows and the adapter's scores of the 8-step run (constant schedule, deterministic)."""
    bench = {"path": str(mmlu_dir), "name": "mmlu", "shots": 1, "every": 2}
    rows = {}
    for name, lengths in (("whole", [8]), ("continued", [4, 8])):
        (tmp_path / name).mkdir()
        run = write_run_yaml(tmp_path / name, tiny_llama, train={"scheduler": "constant", "eval_benchmark": bench})
        for steps in lengths:
            train(config(run, "output.overwrite=false", f"train.max_steps={steps}"))
        rows[name] = [r for r in read_rows(tmp_path / name / "out" / "metrics.jsonl") if "benchmark_acc" in r]
    assert [r["step"] for r in rows["whole"]] == [r["step"] for r in rows["continued"]] == [0, 2, 4, 6, 8]
    for a, b in zip(rows["whole"], rows["continued"]):
        assert a["benchmark_answer_logprob"] == b["benchmark_answer_logprob"] and a["benchmark_acc"] == b["benchmark_acc"]
