"""The Evaluate tab driven through its handlers (no browser): an eval YAML of the workspace picked, run as
`loratune eval` on the demo model and a small multiple-choice task, and its report.md shown."""

from __future__ import annotations

import json
import re
import shutil
import time
from pathlib import Path

import pytest

from loratune.ui.context import Context
from loratune.ui.jobs import Jobs
from loratune.ui.paths import Workspace
from loratune.ui.tab_eval import follow_eval, pick_config, run_eval

ROOT = Path(__file__).resolve().parents[2]
EVAL_YAML = """\
models:
  - {name: base, path: demo://llama-test}
mc:
  - {name: sample_mc, path: data/mmlu_sample, shots: 1, style: cloze, limit: 2}
output:
  dir: evals/ui
"""


@pytest.mark.slow
def test_an_eval_run_from_the_tab_shows_its_report(tmp_path: Path):
    root = tmp_path / "ws"
    shutil.copytree(ROOT / "examples/data/mmlu_sample", root / "data/mmlu_sample")
    (root / "eval.yaml").write_text(EVAL_YAML)
    ws = Workspace.at(root)
    ctx = Context(ws=ws, jobs=Jobs(ws), lang=None, timer=None)

    error, text = pick_config(ctx, "eval.yaml", "en")
    assert error == "" and text == EVAL_YAML
    error, job_id = run_eval(ctx, text, "en")
    assert error == "" and isinstance(job_id, str)

    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        status, log, report = follow_eval(ctx, job_id, "en")
        if not status.endswith(": running"):
            break
        assert report == ""  # no report while the job runs
        time.sleep(0.5)
    assert status == "evals/ui: finished", log
    written = (root / "evals/ui/report.md").read_text(encoding="utf-8")
    assert report == written and "## Multiple choice: sample_mc" in report
    assert "1-shot, `cloze` style, 4 questions in 2 subjects" in report  # limit 2 per subject, both subjects
    acc = re.search(r"^\| acc \(log-likelihood\) \| (\d\.\d{3}) \[[\d.]+, [\d.]+\] \(n=4\) \|$", report, re.M)
    assert acc and float(acc.group(1)) in (0.0, 0.25, 0.5, 0.75, 1.0), report  # k correct of 4
    summary = json.loads((root / "evals/ui/report.json").read_text())
    assert summary["config"]["mc"][0]["limit"] == 2 and summary["config"]["models"][0]["path"] == "demo://llama-test"
    status_zh, _, report_zh = follow_eval(ctx, job_id, "zh")
    assert status_zh == "evals/ui: 已完成" and report_zh == written


def test_a_bad_eval_config_is_reported_and_nothing_runs(tmp_path: Path):
    ws = Workspace.at(tmp_path)
    ctx = Context(ws=ws, jobs=Jobs(ws), lang=None, timer=None)
    error, _ = pick_config(ctx, "../outside.yaml", "en")
    assert "outside the workspace" in error
    error, _ = run_eval(ctx, EVAL_YAML.replace("evals/ui", "../out"), "en")
    assert "output.dir: '../out' is outside the workspace" in error and Jobs(ws).all() == []
