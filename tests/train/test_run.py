"""End to end in this process: what a run writes and prints, evaluation, early stopping, the best
adapter, resume decisions (damaged checkpoints, changed config, finished runs)."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from train_helpers import adapter_bytes, config, write_run_yaml
from transformers import AutoModelForCausalLM

from loratune.errors import ConfigError
from loratune.train.checkpoint import MANIFEST, checkpoint_name, list_checkpoints, step_of
from loratune.train.metrics import read_rows
from loratune.train.resume import ResumeError
from loratune.train.run import train


def test_outputs_metrics_plot_tensorboard_and_summary(tmp_path: Path, tiny_llama: Path, capsys) -> None:
    cfg = config(write_run_yaml(tmp_path, tiny_llama), "train.plot=true", "train.tensorboard=true")
    result = train(cfg)
    out = tmp_path / "out"
    assert result.exit_code == 0 and result.steps == 8 and result.best_step == 8

    rows = read_rows(out / "metrics.jsonl")
    steps = [r for r in rows if "loss" in r]
    assert [r["step"] for r in steps] == list(range(1, 9))
    assert set(steps[0]) >= {"step", "epoch", "loss", "lr", "grad_norm", "tokens_per_s", "memory_gib"}
    assert [r["step"] for r in rows if "eval_loss" in r] == [3, 6, 8]
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert any(f.name.startswith("events.out.tfevents") for f in (out / "tensorboard").iterdir())

    printed = capsys.readouterr().out
    assert "training done: 8 steps" in printed and "best eval loss" in printed
    assert f"loratune chat {out}" in printed

    # no pickle anywhere; the output folder and every checkpoint are standard PEFT adapters
    assert not [f for f in out.rglob("*") if f.suffix in (".bin", ".pt", ".pth", ".pkl", ".pickle")]
    assert [step_of(p) for p in list_checkpoints(out / "checkpoints")] == [8, 6]  # keep_last 2
    base = AutoModelForCausalLM.from_pretrained(tiny_llama)
    ids = torch.tensor([[0, 5, 6, 7, 8]])
    for folder in (out, out / "checkpoints" / checkpoint_name(6)):
        model = PeftModel.from_pretrained(base, folder)
        assert torch.isfinite(model(ids).logits).all()
        base = model.unload()
    assert adapter_bytes(out) == adapter_bytes(out / "checkpoints" / checkpoint_name(8))


def test_early_stopping_and_the_best_adapter(tmp_path: Path, tiny_llama: Path, capsys) -> None:
    # a huge min_delta: no evaluation counts as an improvement after the first
    cfg = config(write_run_yaml(tmp_path, tiny_llama), "train.max_steps=20", "train.eval_every=2",
                 "train.save_every=0", "train.early_stopping_patience=2", "train.early_stopping_min_delta=100",
                 "output.adapter=best")
    result = train(cfg)
    assert result.stopped_early and result.steps == 6
    assert "early stopping at step 6" in capsys.readouterr().err
    best = tmp_path / "out" / "checkpoints" / checkpoint_name(result.best_step)
    assert best.is_dir()  # saved because output.adapter=best, and kept by rotation
    assert adapter_bytes(tmp_path / "out") == adapter_bytes(best)


def test_damaged_newest_checkpoint_is_skipped_and_the_previous_one_used(
        tmp_path: Path, tiny_llama: Path, monkeypatch, caplog) -> None:
    caplog.set_level(logging.INFO, logger="loratune.train")
    path = write_run_yaml(tmp_path, tiny_llama)
    want = adapter_bytes(train(config(path, "output.dir=" + str(tmp_path / "ref"))).out_dir)

    monkeypatch.setenv("LORATUNE_FAULT", "term@step.end#7")  # a graceful stop after step 7 (signal to self)
    stopped = train(config(path))
    assert stopped.interrupted == "SIGTERM" and stopped.exit_code == 143 and stopped.steps == 7
    monkeypatch.delenv("LORATUNE_FAULT")
    root = tmp_path / "out" / "checkpoints"
    assert [step_of(p) for p in list_checkpoints(root)] == [7, 6]
    newest = root / checkpoint_name(7) / "adapter_model.safetensors"
    newest.write_bytes(newest.read_bytes()[:-7])  # half-written
    (root / checkpoint_name(9)).mkdir()  # a folder that never got its manifest

    result = train(config(path))
    assert result.steps == 8
    assert "skipping checkpoint" in caplog.text and "no manifest" in caplog.text
    assert "adapter_model.safetensors has" in caplog.text  # the size check caught the truncation
    assert f"resuming from {root / checkpoint_name(6)}" in caplog.text
    assert adapter_bytes(tmp_path / "out") == want


def test_changed_config_is_refused_with_a_diff_unless_allowed(tmp_path: Path, tiny_llama: Path, monkeypatch) -> None:
    path = write_run_yaml(tmp_path, tiny_llama)
    monkeypatch.setenv("LORATUNE_FAULT", "term@step.end#4")
    assert train(config(path)).interrupted
    monkeypatch.delenv("LORATUNE_FAULT")
    with pytest.raises(ResumeError) as e:
        train(config(path, "train.lr=1e-3", "adapter.dropout=0.0", "train.log_every=5"))
    message = str(e.value)
    assert "train.lr: 0.003 -> 0.001" in message and "adapter.dropout: 0.1 -> 0.0" in message
    assert "log_every" not in message  # bookkeeping keys may change freely
    assert "train.allow_config_change=true" in message
    result = train(config(path, "train.lr=1e-3", "train.allow_config_change=true"))
    assert result.steps == 8


def test_unfinished_runs_are_not_overwritten_silently(tmp_path: Path, tiny_llama: Path, monkeypatch) -> None:
    """(Finished runs: test_continue.py.)"""
    path = write_run_yaml(tmp_path, tiny_llama)
    train(config(path, "train.max_steps=2"))
    monkeypatch.setenv("LORATUNE_FAULT", "term@step.end#1")
    train(config(path, "train.max_steps=4"))  # overwrite=true: starts afresh, then stops at step 1
    monkeypatch.delenv("LORATUNE_FAULT")
    with pytest.raises(ConfigError, match="holds an unfinished run; continue it with train.resume=auto"):
        train(config(path, "train.max_steps=4", "train.resume=off", "output.overwrite=false"))
    fresh = train(config(path, "train.max_steps=4", "train.resume=off"))  # overwrite=true: from step 0
    assert fresh.steps == 4 and [r["step"] for r in read_rows(tmp_path / "out" / "metrics.jsonl")
                                 if "loss" in r] == [1, 2, 3, 4]


def test_resume_from_an_explicit_checkpoint_path(tmp_path: Path, tiny_llama: Path) -> None:
    path = write_run_yaml(tmp_path, tiny_llama)
    first = train(config(path, "output.dir=" + str(tmp_path / "a")))
    ckpt = tmp_path / "a" / "checkpoints" / checkpoint_name(6)
    result = train(config(path, f"train.resume={ckpt}", "output.dir=" + str(tmp_path / "b")))
    assert result.steps == 8 and adapter_bytes(tmp_path / "b") == adapter_bytes(first.out_dir)
    os.remove(ckpt / MANIFEST)
    with pytest.raises(ResumeError, match="not a complete checkpoint: no manifest"):
        train(config(path, f"train.resume={ckpt}", "output.dir=" + str(tmp_path / "c")))


def test_full_fine_tuning_resumes_exactly(tmp_path: Path, tiny_llama: Path, monkeypatch) -> None:
    """adapter.type none: every weight trains; checkpoints hold the full model (safetensors) and resume exactly."""
    sections = {"adapter": {"type": "none"}, "quantization": {"bits": 32}}
    ref = tmp_path / "ref"
    ref.mkdir()
    want = train(config(write_run_yaml(ref, tiny_llama, **sections)))
    path = write_run_yaml(tmp_path, tiny_llama, **sections)
    monkeypatch.setenv("LORATUNE_FAULT", "term@step.end#4")
    assert train(config(path)).interrupted == "SIGTERM"
    monkeypatch.delenv("LORATUNE_FAULT")
    result = train(config(path))
    assert result.steps == 8
    got, expected = (tmp_path / "out" / "model.safetensors").read_bytes(), (want.out_dir / "model.safetensors").read_bytes()
    assert got == expected
