"""The UI's logic without a browser: jobs, path checks of configs, data preview, runs, the message catalogue."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest

from loratune.config import load_config
from loratune.errors import LoratuneError
from loratune.ui import form, i18n, runs, training
from loratune.ui.jobs import JOB_VARIABLE, Job, Jobs
from loratune.ui.paths import Workspace, WorkspaceError
from loratune.ui.tab_data import SUPERVISED, preview_data, save_upload

ROOT = Path(__file__).resolve().parents[2]
UI = ROOT / "src" / "loratune" / "ui"


@pytest.fixture
def ws(tmp_path: Path) -> Workspace:
    root = tmp_path / "ws"
    (root / "data").mkdir(parents=True)
    (root / "data" / "q.jsonl").write_text((ROOT / "examples/data/quickstart.jsonl").read_text())
    return Workspace.at(root)


def _wait(jobs: Jobs, job: Job, timeout: float = 60) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        current = jobs.get(job.id)
        if jobs.status(current) != "running" and current.returncode is not None:
            return jobs.status(current)
        time.sleep(0.2)
    raise AssertionError(f"job {job.id} still running")


def test_a_job_runs_the_cli_in_the_workspace_and_is_found_again(ws: Workspace):
    jobs = Jobs(ws)
    job = jobs.start("docs", ["config-docs", "--out", "reference.md"], ws.root)
    assert _wait(jobs, job) == "finished"
    assert (ws.root / "reference.md").read_text().startswith("# Configuration reference")
    again = Jobs(ws).all()  # a new UI process reads the same records
    assert [j.id for j in again] == [job.id] and again[0].returncode == 0
    failing = jobs.start("train", ["train", "missing.yaml"], ws.root)
    assert _wait(jobs, failing) == "failed (exit code 2)"
    assert "error: config file not found: missing.yaml" in jobs.log(failing)


def test_running_means_the_jobs_own_process(ws: Workspace):
    jobs = Jobs(ws)
    mine = subprocess.Popen(["sleep", "30"], env={**os.environ, JOB_VARIABLE: "job-a"})
    other = subprocess.Popen(["sleep", "30"])  # a reused pid: not the job's process
    try:
        a = Job("job-a", "train", [], "run", mine.pid, time.time())
        b = Job("job-b", "train", [], "run", other.pid, time.time())
        assert jobs.status(a) == "running" and jobs.status(b) == "ended"
        assert jobs.stop(a) and not jobs.stop(b)
        assert mine.wait(timeout=10) == -signal.SIGTERM
        assert jobs.status(a) == "ended"
        a.returncode = 143
        assert jobs.status(a) == "stopped"
    finally:
        for p in (mine, other):
            p.kill()
            p.wait()


@pytest.mark.parametrize("override,key", [
    ("model.path=../elsewhere", "model.path"), ("model.path=/etc", "model.path"),
    ("output.dir=/tmp/out", "output.dir"), ("output.dir=../out", "output.dir"),
    ("data.datasets=[{path: ../../etc/passwd}]", "data.datasets.0.path"),
    ("data.template=../t.jinja", "data.template"), ("train.resume=/etc", "train.resume"),
    ("model.tokenizer=/etc", "model.tokenizer"), ("model.trust_remote_code=true", "model.trust_remote_code"),
])
def test_a_config_whose_paths_leave_the_workspace_is_refused(ws: Workspace, override: str, key: str):
    cfg = load_config(None, ["model.path=demo://llama-test", "data.datasets=[{path: data/q.jsonl}]", override])
    with pytest.raises(WorkspaceError) as e:
        training.check_paths(cfg, ws)
    assert str(e.value).startswith(key)
    assert form.field_of_error(str(e.value)) == key.split(".0.")[0]


def test_launch_writes_the_yaml_and_refuses_a_second_run_into_the_same_folder(ws: Workspace):
    jobs = Jobs(ws)
    cfg = load_config(None, ["model.path=demo://llama-test", "data.datasets=[{path: data/q.jsonl}]",
                             "output.dir=runs/a", "train.max_steps=1"])
    values = form.values_of(cfg)
    job = training.launch(values, ws, jobs)
    try:
        assert load_config(jobs.config_path(job.id)) == cfg
        assert job.target == "runs/a" and job.argv[-2] == "train"
        if jobs.status(job) == "running":
            with pytest.raises(LoratuneError, match="is being trained by job"):
                training.launch(values, ws, jobs)
    finally:
        jobs.stop(job)
        _wait(jobs, job, timeout=120)


def test_data_preview_is_trainings_own_preparation(ws: Workspace):
    stats, pieces = preview_data(ws, "data/q.jsonl", "demo://llama-test", "auto", "auto", 256, "assistant", 2)
    assert "messages" in stats and "template:" in stats
    supervised = "".join(text for text, label in pieces if label == SUPERVISED)
    assert "loratune is a toolkit for fine-tuning" in supervised  # the first answer carries loss
    assert "What is loratune?" not in supervised  # the question does not
    assert sum(1 for text, _ in pieces if text.startswith("\n── ")) == 2


def test_data_errors_name_file_and_row(ws: Workspace):
    good = (ws.root / "data" / "q.jsonl").read_text().splitlines()[0]
    (ws.root / "data" / "bad.jsonl").write_text(good + '\n{not json\n')
    with pytest.raises(LoratuneError, match=r"bad.jsonl: row 2: not valid JSON"):
        preview_data(ws, "data/bad.jsonl", "demo://llama-test", "auto", "auto", 256, "assistant", 2)
    with pytest.raises(WorkspaceError, match="outside the workspace"):
        preview_data(ws, "../x.jsonl", "demo://llama-test", "auto", "auto", 256, "assistant", 2)


def test_uploads_land_in_the_workspace_under_a_safe_name(ws: Workspace, tmp_path: Path):
    src = tmp_path / "../..evil name.jsonl"
    src.write_text('{"text": "x"}\n')
    rel = save_upload(ws, str(src))
    assert rel == "uploads/evil_name.jsonl" and (ws.root / rel).read_text() == '{"text": "x"}\n'
    assert save_upload(ws, str(src)) == "uploads/evil_name-1.jsonl"  # never overwrites
    exe = tmp_path / "run.sh"
    exe.write_text("echo")
    with pytest.raises(WorkspaceError, match="expected one of"):
        save_upload(ws, str(exe))


def test_runs_are_read_back(ws: Workspace):
    run = ws.root / "runs" / "r1"
    (run / "checkpoints" / "step-1").mkdir(parents=True)
    rows = [{"step": 1, "loss": 2.5}, {"step": 2, "loss": 2.0}, {"step": 2, "eval_loss": 2.2}]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 3, "lo')
    (run / "samples.json").write_text(json.dumps({"samples": [{"prompt": "hi", "before": "x", "after": "hello"}]}))
    (run / "checkpoints" / "step-1" / "metrics.jsonl").write_text("")  # checkpoints are not runs
    found = runs.find_runs(ws)
    assert [(r.name, r.step, r.loss, r.has_adapter) for r in found] == [("runs/r1", 2, 2.0, False)]
    assert runs.metrics(run) == [{"step": 1, "loss": 2.5, "series": "loss"}, {"step": 2, "loss": 2.0, "series": "loss"},
                                 {"step": 2, "loss": 2.2, "series": "eval_loss"}]
    assert runs.samples(run)[0]["after"] == "hello"


def test_every_catalogue_key_exists_in_every_language_with_the_same_placeholders():
    english = i18n.CATALOGUE["en"]
    for lang in i18n.LANGUAGES:
        table = i18n.CATALOGUE[lang]
        assert set(table) == set(english), (lang, set(english) ^ set(table))
        for key, text in table.items():
            assert set(re.findall(r"{(\w+)}", text)) == set(re.findall(r"{(\w+)}", english[key])), (lang, key)
            assert text.strip(), (lang, key)
    assert i18n.t("train.progress", "zh", run="r", status="s", step=3, loss="1.0") == "**r**：s · 第 3 步 · 损失 1.0"


def test_every_key_the_ui_uses_is_in_the_catalogue():
    used = set()
    for path in UI.glob("*.py"):
        text = path.read_text(encoding="utf-8")
        used |= set(re.findall(r"""(?:text|button|heading|t|labels\.add\([^,]+,)\(?\s*["']([a-z]+\.[a-z_]+)["']""", text))
        used |= {f"{m}" for m in re.findall(r'"(tab\.[a-z]+)"', text)}
    statuses = {"status.running", "status.finished", "status.stopped", "status.failed", "status.ended"}
    missing = (used | statuses) - set(i18n.CATALOGUE["en"])
    assert len(used) > 40 and not missing, missing


EVAL = """models:
  - {name: base, path: demo://llama-test}
  - {name: tuned, path: MODEL}
generate:
  - {name: q, path: DATA, metrics: [exact_match]}
output:
  dir: OUT
"""


@pytest.mark.parametrize("model,data,out,extra,message", [
    ("../elsewhere", "data/q.jsonl", "evals/a", "", "models.1.path: '../elsewhere' is outside the workspace"),
    ("demo://llama-test", "/etc/passwd", "evals/a", "", "generate.0.path: '/etc/passwd' is outside the workspace"),
    ("demo://llama-test", "data/q.jsonl", "../out", "", "output.dir: '../out' is outside the workspace"),
    ("demo://llama-test", "data/q.jsonl", "evals/a", "judge: {prompts: data/q.jsonl, model: gpt-4o}\n",
     "judge.prompts: the web UI does not run the judge"),
])
def test_eval_configs_are_checked_before_they_run(ws: Workspace, model, data, out, extra, message):
    from loratune.ui.context import Context
    from loratune.ui.tab_eval import start_eval

    ctx = Context(ws=ws, jobs=Jobs(ws), lang=None, timer=None)
    text = EVAL.replace("MODEL", model).replace("DATA", data).replace("OUT", out) + extra
    with pytest.raises(LoratuneError, match=re.escape(message)):
        start_eval(ctx, text)
    assert Jobs(ws).all() == []  # nothing started


def test_loss_figures_draw_each_series():
    assert runs.figure({}) is None and runs.figure({"a": []}) is None
    points = [{"step": 1, "loss": 2.5, "series": "loss"}, {"step": 2, "loss": 2.0, "series": "loss"},
              {"step": 2, "loss": 2.2, "series": "eval_loss"}]
    fig = runs.figure({"runs/a": points, "runs/b": points[:1]})
    lines = {line.get_label(): line.get_xydata().tolist() for line in fig.axes[0].get_lines()}
    assert lines == {"runs/a train": [[1, 2.5], [2, 2.0]], "runs/a eval": [[2, 2.2]], "runs/b train": [[1, 2.5]]}


def test_chat_streams_when_gradio_resumes_the_generator_on_other_threads():
    # the engine holds a lock that belongs to the thread that took it while it generates; Gradio calls next()
    # on whichever worker thread is free
    import threading
    from concurrent.futures import ThreadPoolExecutor

    from loratune.infer.engine import Delta
    from loratune.ui.tab_chat import answer_stream

    class Engine:
        lock = threading.RLock()

        def chat(self, messages, params, name):
            with self.lock:
                for i, piece in enumerate(("The", " answer", ".")):
                    yield Delta(0, piece, i)

    stream = answer_stream(Engine(), "base", [{"role": "user", "content": "q"}], None)
    seen = []
    for i in range(4):
        with ThreadPoolExecutor(1, thread_name_prefix=f"worker{i}") as pool:  # a new thread each step
            try:
                seen.append(pool.submit(next, stream).result())
            except StopIteration:
                break
    assert seen == ["The", "The answer", "The answer."]
