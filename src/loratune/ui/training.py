"""Train tab logic: check a form's config against the workspace, launch `loratune train`, stop, resume, follow.

The config the form describes is validated exactly as `loratune train` validates it (`form.config_of`),
then every path in it is checked by the workspace gate (`check_paths`), and a config that would run code
shipped with a model (`model.trust_remote_code`) is refused: the page may not run arbitrary code. The YAML
goes to the job's folder and `loratune train JOB/config.yaml` runs in the workspace root, so relative paths
mean there what the gate checked. Progress is read back from the run folder's metrics.jsonl and the log.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from loratune.config import Config
from loratune.errors import ConfigError
from loratune.ui import form
from loratune.ui.jobs import Job, Jobs
from loratune.ui.paths import Workspace, WorkspaceError

SOURCE_KEYS = {"path", "tokenizer", "dev_path"}  # a file, a folder, a hub id or demo://
FOLDER_KEYS = {"dir"}


def _walk(obj: Any, prefix: str):
    """(dotted key, leaf name, value) of every string in a config, lists included."""
    if dataclasses.is_dataclass(obj):
        for f in dataclasses.fields(obj):
            yield from _walk(getattr(obj, f.name), f"{prefix}.{f.name}" if prefix else f.name)
    elif isinstance(obj, list):
        for i, item in enumerate(obj):
            yield from _walk(item, f"{prefix}.{i}")
    elif isinstance(obj, str):
        yield prefix, prefix.rsplit(".", 1)[-1], obj


def check_paths(cfg: Any, ws: Workspace) -> None:
    """Every path of a training (or eval) config inside the workspace; `WorkspaceError` names the key."""
    if getattr(getattr(cfg, "model", None), "trust_remote_code", False):
        raise WorkspaceError("model.trust_remote_code: the web UI does not run code shipped with a model; "
                             "train such a model with the CLI")
    for key, leaf, value in _walk(cfg, ""):
        if leaf in SOURCE_KEYS or (key.startswith("models.") and leaf == "path"):
            ws.source(value, key)
        elif leaf in FOLDER_KEYS or leaf == "prompts":
            ws.resolve(value, key)
        elif key == "data.template" and (value.endswith(".jinja") or "/" in value):
            ws.resolve(value, key, kind="file")
        elif key == "train.resume" and value not in ("auto", "off"):
            ws.resolve(value, key, must_exist=True)


def checked_config(values: dict, ws: Workspace) -> Config:
    cfg = form.config_of(values)
    check_paths(cfg, ws)
    return cfg


def launch(values: dict, ws: Workspace, jobs: Jobs) -> Job:
    """Start `loratune train` on the form's config; refused while a run is training into the same folder."""
    cfg = checked_config(values, ws)
    out = ws.resolve(cfg.output.dir, "output.dir")
    running = jobs.latest_for(ws.relative(out))
    if running is not None and jobs.status(running) == "running":
        raise ConfigError(f"output.dir: {ws.relative(out)} is being trained by job {running.id}; stop it first")
    job_id = jobs.new_id("train", ws.relative(out))
    config = jobs.config_path(job_id)
    config.write_text(form.yaml_of(values), encoding="utf-8")
    return jobs.start("train", ["train", str(config.relative_to(ws.root))], out, job_id)


def resume(job: Job, ws: Workspace, jobs: Jobs) -> Job:
    """Run a stopped training job's config again with train.resume=auto (it continues from its checkpoint)."""
    if job.kind != "train":
        raise WorkspaceError(f"job {job.id} is not a training run")
    if jobs.status(job) == "running":
        raise WorkspaceError(f"job {job.id} is still running")
    source = jobs.config_path(job.id)
    job_id = jobs.new_id("train", job.target)
    config = jobs.config_path(job_id)
    config.write_text(source.read_text(encoding="utf-8"), encoding="utf-8")
    return jobs.start("train", ["train", str(config.relative_to(ws.root)), "train.resume=auto"],
                      ws.resolve(job.target, "output.dir"), job_id)


def progress_line(job: Job, jobs: Jobs, last: dict | None, max_steps: int | None) -> str:
    status = jobs.status(job)
    if not last:
        return f"{job.target}: {status}"
    total = f"/{max_steps}" if max_steps and max_steps > 0 else ""
    return f"{job.target}: {status} · step {last.get('step')}{total} · loss {last.get('loss', float('nan')):.4f}"
