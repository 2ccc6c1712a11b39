"""A finished run, run again: nothing to do (and how to continue), continued exactly when asked for more steps
or epochs, discarded only with output.overwrite, and said so in each case."""

from __future__ import annotations

import logging
import math
from pathlib import Path

import pytest
from train_helpers import adapter_bytes, config, write_run_yaml

from loratune.errors import ConfigError
from loratune.train import run as run_module
from loratune.train.run_folder import RUN_FILE
from loratune.train.checkpoint import checkpoint_name
from loratune.train.metrics import read_rows
from loratune.train.run import train

KEEP = "output.overwrite=false"


def _train_rows(out: Path) -> list[dict]:
    return [r for r in read_rows(out / "metrics.jsonl") if "loss" in r]


def _no_loading(monkeypatch) -> None:
    """Make any attempt to load the tokenizer, data or model fail: a finished run must be judged without them."""
    def never(*a, **k):
        raise AssertionError("loaded something for a run with nothing to do")

    for name in ("load_tokenizer", "prepare_data", "build_trainable", "check_memory"):
        monkeypatch.setattr(run_module, name, never)


def test_a_finished_run_is_not_retrained_and_says_how_to_continue(tmp_path: Path, tiny_llama: Path, capsys,
                                                                   monkeypatch) -> None:
    path = write_run_yaml(tmp_path, tiny_llama)
    first = train(config(path, KEEP, "train.max_steps=4"))
    out = tmp_path / "out"
    before = {f: f.stat().st_mtime_ns for f in out.rglob("*") if f.is_file()}
    capsys.readouterr()

    _no_loading(monkeypatch)
    again = train(config(path, KEEP, "train.max_steps=4"))
    assert again.nothing_to_do and again.exit_code == 0
    assert (again.steps, again.tokens, again.last_loss) == (4, first.tokens, first.last_loss)
    assert again.first_loss == first.first_loss and again.best_eval_loss == first.best_eval_loss
    printed = capsys.readouterr().out
    assert printed == (
        f"{out} already holds this run, finished: 4 steps, train loss {first.last_loss:.4f}, best eval loss "
        f"{first.best_eval_loss:.4f} at step 4. Nothing to train.\n"
        "To train it further, raise train.max_steps (now 4; e.g. train.max_steps=8) and run again: training "
        "continues from its final checkpoint (step 4) exactly. To train it afresh, set output.overwrite=true.\n"
        f"chat with it:  loratune chat {out}\n")
    assert {f: f.stat().st_mtime_ns for f in out.rglob("*") if f.is_file()} == before  # nothing touched


def test_more_steps_continue_a_finished_run_exactly(tmp_path: Path, tiny_llama: Path, caplog) -> None:
    """Constant schedule: 8 steps, then raised to 12, is the 12-step run bit for bit (adapter, losses, lr)."""
    caplog.set_level(logging.INFO, logger="loratune.train")
    sections = {"train": {"scheduler": "constant", "warmup_steps": 2}}
    ref_dir = tmp_path / "ref"
    ref_dir.mkdir()
    ref = train(config(write_run_yaml(ref_dir, tiny_llama, **sections), "train.max_steps=12"))
    path = write_run_yaml(tmp_path, tiny_llama, **sections)
    train(config(path, KEEP, "train.max_steps=8"))
    out = tmp_path / "out"
    caplog.clear()

    result = train(config(path, KEEP, "train.max_steps=12"))
    assert result.steps == 12 and not result.nothing_to_do
    assert adapter_bytes(out) == adapter_bytes(ref.out_dir)
    said = [r.getMessage() for r in caplog.records if "continuing" in r.getMessage()]
    assert said == [f"continuing the finished run in {out} from its final checkpoint (step 8) to step 12 (4 more), "
                    "exactly where it stopped (weights, optimizer state, data order, random state); lr 3.00e-03 at "
                    "step 9 (constant schedule)"]
    assert "resuming from" not in caplog.text  # the one line says it all
    rows, ref_rows = _train_rows(out), _train_rows(ref.out_dir)
    assert [r["step"] for r in rows] == list(range(1, 13))  # each step once
    assert [(r["loss"], r["lr"]) for r in rows] == [(r["loss"], r["lr"]) for r in ref_rows]
    assert (result.first_loss, result.last_loss, result.tokens) == (ref.first_loss, ref.last_loss, ref.tokens)
    assert (out / RUN_FILE).is_file()  # finished again
    assert (out / "checkpoints" / checkpoint_name(12)).is_dir()


def test_a_continued_cosine_schedule_is_the_longer_runs_schedule(tmp_path: Path, tiny_llama: Path, caplog) -> None:
    """Steps 9-12 of a cosine run of 8 continued to 12 use the rates of a 12-step run, and the line says so."""
    caplog.set_level(logging.INFO, logger="loratune.train")
    ref_dir = tmp_path / "ref"
    ref_dir.mkdir()
    ref = train(config(write_run_yaml(ref_dir, tiny_llama), "train.max_steps=12"))  # cosine, warmup 2, lr 3e-3
    path = write_run_yaml(tmp_path, tiny_llama)
    train(config(path, KEEP, "train.max_steps=8"))
    train(config(path, KEEP, "train.max_steps=12"))
    lrs = {r["step"]: r["lr"] for r in _train_rows(tmp_path / "out")}
    ref_lrs = {r["step"]: r["lr"] for r in _train_rows(ref.out_dir)}
    assert [lrs[s] for s in range(9, 13)] == [ref_lrs[s] for s in range(9, 13)]
    # step 9 is the 9th update: multiplier at scheduler position 8 of 12 (warmup 2): 0.5 (1 + cos(pi 6/10))
    want = 3e-3 * 0.5 * (1 + math.cos(math.pi * 0.6))
    assert lrs[9] == pytest.approx(want, rel=1e-12) and lrs[8] != ref_lrs[8]
    assert (f"step 12 (4 more), exactly where it stopped (weights, optimizer state, data order, random state); cosine "
            f"lr schedule now planned over 12 steps from the start: step 9 uses {want:.2e} (the checkpoint's "
            "schedule gave 0.00e+00)") in caplog.text


def test_more_epochs_continue_and_the_same_epochs_do_nothing(tmp_path: Path, tiny_llama: Path, caplog,
                                                             monkeypatch) -> None:
    """20 samples, batch 2, accumulation 2: 5 steps an epoch. epochs 1 -> 2 continues from 5 to 10."""
    caplog.set_level(logging.INFO, logger="loratune.train")
    path = write_run_yaml(tmp_path, tiny_llama, train={"max_steps": -1, "epochs": 1})
    assert train(config(path, KEEP)).steps == 5
    result = train(config(path, KEEP, "train.epochs=2"))
    assert result.steps == 10 and "from its final checkpoint (step 5) to step 10 (5 more)" in caplog.text
    _no_loading(monkeypatch)  # recorded steps per epoch: judged without loading anything
    again = train(config(path, KEEP, "train.epochs=2"))
    assert again.nothing_to_do and again.steps == 10


def test_overwrite_discards_a_finished_run_and_says_so(tmp_path: Path, tiny_llama: Path, caplog) -> None:
    caplog.set_level(logging.INFO, logger="loratune.train")
    path = write_run_yaml(tmp_path, tiny_llama)
    first = train(config(path, KEEP, "train.max_steps=4"))
    result = train(config(path, "output.overwrite=true", "train.max_steps=6"))
    out = tmp_path / "out"
    warned = [r for r in caplog.records if "discarding" in r.getMessage()]
    assert len(warned) == 1 and warned[0].levelno == logging.WARNING
    assert warned[0].getMessage() == (
        f"output.overwrite=true: discarding the finished run in {out} (4 steps, train loss {first.last_loss:.4f}, "
        f"best eval loss {first.best_eval_loss:.4f} at step 4); training starts again from step 0. To continue that "
        "run instead, run with output.overwrite=false and a larger train.max_steps")
    assert result.steps == 6 and [r["step"] for r in _train_rows(out)] == list(range(1, 7))
    assert "continuing" not in caplog.text and "resuming" not in caplog.text


def test_fewer_steps_other_settings_and_resume_off_are_refused(tmp_path: Path, tiny_llama: Path) -> None:
    path = write_run_yaml(tmp_path, tiny_llama)
    train(config(path, KEEP, "train.max_steps=4"))
    with pytest.raises(ConfigError, match="this config plans 3 steps, fewer: that is another run"):
        train(config(path, KEEP, "train.max_steps=3"))
    with pytest.raises(ConfigError) as e:
        train(config(path, KEEP, "train.max_steps=6", "train.lr=1e-3"))
    assert "holds a finished run (4 steps" in str(e.value) and "train.lr: 0.003 -> 0.001" in str(e.value)
    assert "train.max_steps" not in str(e.value)  # the length may change: that is how a run is continued
    with pytest.raises(ConfigError, match="train.resume=off starts from step 0 only with output.overwrite=true"):
        train(config(path, KEEP, "train.resume=off"))
    # the refusals changed nothing: the run is still finished and continues when asked
    assert train(config(path, KEEP, "train.max_steps=5")).steps == 5


def test_an_unfinished_run_may_be_made_longer_when_resumed(tmp_path: Path, tiny_llama: Path, caplog,
                                                           monkeypatch) -> None:
    caplog.set_level(logging.INFO, logger="loratune.train")
    path = write_run_yaml(tmp_path, tiny_llama, train={"scheduler": "constant"})
    monkeypatch.setenv("LORATUNE_FAULT", "term@step.end#4")
    assert train(config(path, "train.max_steps=8")).interrupted
    monkeypatch.delenv("LORATUNE_FAULT")
    with pytest.raises(ConfigError, match="is at step 4, past the 3 steps this config plans"):
        train(config(path, "train.max_steps=3"))
    result = train(config(path, "train.max_steps=10"))
    assert result.steps == 10
    assert "the run now ends at step 10 instead of 8; lr 3.00e-03 at step 5 (constant schedule)" in caplog.text


def test_a_run_that_stopped_early_is_finished_and_continues_to_its_next_evaluation(
        tmp_path: Path, tiny_llama: Path, capsys, caplog) -> None:
    caplog.set_level(logging.INFO, logger="loratune.train")
    # a huge min_delta: no evaluation after the first counts as an improvement; patience 2 stops at step 6
    path = write_run_yaml(tmp_path, tiny_llama, train={
        "max_steps": 20, "eval_every": 2, "save_every": 0, "early_stopping_patience": 2,
        "early_stopping_min_delta": 100}, output={"overwrite": False})
    assert train(config(path)).steps == 6
    capsys.readouterr()
    again = train(config(path))
    assert again.nothing_to_do and again.steps == 6
    assert "already holds this run, finished: 6 steps of 20 (stopped early)" in capsys.readouterr().out
    longer = train(config(path, "train.max_steps=30"))
    assert (longer.steps, longer.stopped_early) == (8, True)  # the next evaluation, at step 8, did not improve
    assert ("from its final checkpoint (step 6) to step 30 (24 more)" in caplog.text
            and "it had stopped early: it stops again at its next evaluation unless the eval loss improves"
            in caplog.text)
