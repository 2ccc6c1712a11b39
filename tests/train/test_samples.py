"""Sample answers before and after training (output.sample_prompts): they show what training changed, match
what `loratune chat` answers, and leave training itself exactly as it is without them."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

from train_helpers import adapter_bytes, config, write_run_yaml

from loratune.cli import main
from loratune.train.metrics import read_rows
from loratune.train.run import train
from loratune.train.samples import SAMPLES_FILE

PROMPTS = ["What is the capital of France?", "Who are you?"]
SAMPLES = ("output.sample_prompts=" + json.dumps(PROMPTS), "output.sample_max_new_tokens=12")


def _trajectory(out: Path) -> list[tuple]:
    return [(r["step"], r.get("loss"), r.get("grad_norm"), r.get("eval_loss")) for r in read_rows(out / "metrics.jsonl")]


def test_answers_change_with_training_and_equal_what_chat_answers(tmp_path: Path, tiny_llama: Path, capsys) -> None:
    path = write_run_yaml(tmp_path, tiny_llama)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # generating with the training model warns about nothing
        result = train(config(path, *SAMPLES, "train.max_steps=12", "adapter.dropout=0"))
    printed = capsys.readouterr().out
    assert "sample answers before training" in printed and "sample answers, before -> after training" in printed
    assert printed.index("sample answers before training") < printed.index("training done")

    saved = json.loads((result.out_dir / SAMPLES_FILE).read_text())
    assert saved["after_step"] == 12 and [s["prompt"] for s in saved["samples"]] == PROMPTS
    for s in saved["samples"]:
        assert isinstance(s["before"], str) and isinstance(s["after"], str)
        assert s["before"] != s["after"]  # the trained adapter answers differently
        assert f"after:  {s['after'].strip()}" in printed

    for s in saved["samples"]:  # the "after" answer is the one `loratune chat OUT` gives greedily
        code = main(["chat", str(result.out_dir), "--prompt", s["prompt"], "--temperature", "0",
                     "--max-tokens", "12"])
        assert code == 0
        assert capsys.readouterr().out == s["after"] + "\n"


def test_training_is_identical_with_and_without_sample_prompts(tmp_path: Path, tiny_llama: Path) -> None:
    # dropout 0.1 and a held-out eval split: any randomness consumed, any mode left switched, or any change
    # to the 4-bit base by generation would show in the losses or the adapter
    path = write_run_yaml(tmp_path, tiny_llama)
    plain = train(config(path, "output.dir=" + str(tmp_path / "plain")))
    sampled = train(config(path, "output.dir=" + str(tmp_path / "sampled"), *SAMPLES))
    assert (sampled.out_dir / SAMPLES_FILE).is_file() and not (plain.out_dir / SAMPLES_FILE).exists()
    assert _trajectory(sampled.out_dir) == _trajectory(plain.out_dir)
    assert adapter_bytes(sampled.out_dir) == adapter_bytes(plain.out_dir)


def test_a_resumed_run_keeps_its_before_answers_and_ends_as_the_uninterrupted_one(
        tmp_path: Path, tiny_llama: Path, monkeypatch, capsys) -> None:
    path = write_run_yaml(tmp_path, tiny_llama)
    whole = train(config(path, "output.dir=" + str(tmp_path / "whole"), *SAMPLES))
    capsys.readouterr()

    monkeypatch.setenv("LORATUNE_FAULT", "term@step.end#5")  # SIGTERM to self after step 5: save and stop
    stopped = train(config(path, *SAMPLES))
    assert stopped.interrupted == "SIGTERM" and stopped.steps == 5
    first = capsys.readouterr()
    assert "sample answers before training" in first.out and "after training" not in first.out + first.err
    monkeypatch.delenv("LORATUNE_FAULT")

    resumed = train(config(path, *SAMPLES))
    second = capsys.readouterr().out
    assert resumed.steps == 8 and "sample answers before training" not in second  # no "before" on resume
    assert "sample answers, before -> after training" in second
    assert adapter_bytes(resumed.out_dir) == adapter_bytes(whole.out_dir)
    assert _trajectory(resumed.out_dir) == _trajectory(whole.out_dir)
    assert json.loads((resumed.out_dir / SAMPLES_FILE).read_text()) == json.loads(
        (whole.out_dir / SAMPLES_FILE).read_text())
