"""One reported train loss everywhere: the mean per supervised token over the last log_every steps, on the
console, in metrics.jsonl (hence loss.png) and in the summary, also after a resume; tokens/s over the same window."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import pytest
from train_helpers import config, write_run_yaml

from loratune.train.metrics import Window, read_rows, span_text
from loratune.train.run import train


def test_window_loss_is_per_supervised_token_and_tokens_per_s_over_the_same_steps() -> None:
    entries: list[list[float]] = []
    w = Window(2, entries)
    w.add(10.0, 4, 100, 0.5)  # loss sum 10 over 4 supervised tokens; 100 real tokens in 0.5 s
    assert (w.loss(), w.tokens_per_s(), w.span(1)) == (2.5, 200.0, [1, 1])
    w.add(float("nan"), 5, 50, 0.25)  # a skipped step: no loss, but its tokens and time count for the pace
    assert (w.loss(), w.tokens_per_s(), w.span(2)) == (2.5, 150 / 0.75, [1, 2])
    w.add(6.0, 2, 60, 0.25)  # the first step leaves the window
    assert (w.loss(), w.tokens_per_s(), w.span(3)) == (3.0, 110 / 0.5, [2, 3])
    assert entries == [[0.0, 0, 50, 0.25], [6.0, 2, 60, 0.25]]  # the loop state's list, as checkpoints save it
    w.add(float("nan"), 3, 30, 0.5)
    assert w.loss() == 3.0
    w.add(float("nan"), 3, 30, 0.5)
    assert w.loss() is None  # no finite loss in the window
    # a token-weighted mean, not the mean of step means: (1 + 9) / (1 + 3) = 2.5, where step means give 2.0
    w = Window(4)
    w.add(1.0, 1, 1, 1.0)
    w.add(9.0, 3, 1, 1.0)
    assert w.loss() == 2.5
    assert Window(2, [[1.0, 1, 1, 1.0]] * 5).entries == [[1.0, 1, 1, 1.0]] * 2  # log_every lowered on resume
    assert (span_text([4, 6]), span_text([8, 8])) == ("steps 4-6", "step 8")


def _per_step(tmp_path: Path, tiny_llama: Path) -> dict[int, tuple[float, int]]:
    """{step: (mean loss, supervised tokens)} of the base run, logged every step."""
    ref = tmp_path / "per-step"
    ref.mkdir()
    train(config(write_run_yaml(ref, tiny_llama), "train.log_every=1"))
    rows = [r for r in read_rows(ref / "out" / "metrics.jsonl") if "loss" in r]
    tokens = [0] + [r["tokens"] for r in rows]
    return {r["step"]: (r["loss"], tokens[i + 1] - tokens[i]) for i, r in enumerate(rows)}


def _expected(per_step: dict[int, tuple[float, int]], first: int, last: int) -> float:
    steps = [per_step[s] for s in range(first, last + 1)]
    return sum(loss * n for loss, n in steps) / sum(n for _, n in steps)


def test_console_metrics_and_summary_report_the_same_window_also_after_a_resume(
        tmp_path: Path, tiny_llama: Path, monkeypatch, capsys, caplog) -> None:
    per_step = _per_step(tmp_path, tiny_llama)
    assert len(per_step) == 8 and len({n for _, n in per_step.values()}) > 1  # steps of unequal token counts
    want = {3: _expected(per_step, 1, 3), 6: _expected(per_step, 4, 6), 8: _expected(per_step, 6, 8)}

    whole = tmp_path / "whole"
    whole.mkdir()
    capsys.readouterr()
    train(config(write_run_yaml(whole, tiny_llama), "train.log_every=3"))
    whole_summary = capsys.readouterr().out.splitlines()

    # the same run stopped after step 4 (mid-window) and resumed: the window's steps 4 and 5 come back with it
    path = write_run_yaml(tmp_path, tiny_llama, train={"log_every": 3})
    monkeypatch.setenv("LORATUNE_FAULT", "term@step.end#4")
    assert train(config(path)).interrupted
    monkeypatch.delenv("LORATUNE_FAULT")
    capsys.readouterr()
    caplog.set_level(logging.INFO, logger="loratune.train")
    result = train(config(path))
    summary = capsys.readouterr().out.splitlines()

    rows = {r["step"]: r for r in read_rows(tmp_path / "out" / "metrics.jsonl") if "loss" in r}
    assert sorted(rows) == [3, 6, 8]
    for step, value in want.items():
        assert rows[step]["loss"] == pytest.approx(value, rel=1e-12), step
    whole_rows = {r["step"]: r for r in read_rows(whole / "out" / "metrics.jsonl") if "loss" in r}
    assert {s: r["loss"] for s, r in rows.items()} == {s: r["loss"] for s, r in whole_rows.items()}

    # the console line of a logged step shows that row's loss and tokens/s
    for step in (6, 8):
        line = next(r.getMessage() for r in caplog.records if r.getMessage().startswith(f"step {step}/8 "))
        assert f" loss {rows[step]['loss']:.4f} " in line
        shown = float(re.search(r"([\d,]+) tok/s", line).group(1).replace(",", ""))
        assert abs(shown - rows[step]["tokens_per_s"]) <= 1

    loss_line = f"train loss {want[3]:.4f} (steps 1-3) -> {want[8]:.4f} (steps 6-8), mean per supervised token"
    assert [x for x in summary if x.startswith("train loss")][0].startswith(loss_line)
    assert [x for x in whole_summary if x.startswith("train loss")] == [x for x in summary
                                                                       if x.startswith("train loss")]
    assert (result.first_loss, result.last_loss) == (rows[3]["loss"], rows[8]["loss"])
