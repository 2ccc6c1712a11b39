"""Experiment trackers beside metrics.jsonl (`train.report_to`): Weights & Biases and MLflow.

TensorBoard stays in `loratune.train.metrics` (its event files live in the run folder and are purged on
resume); the trackers here get the same rows, at the same steps, under the same names TensorBoard uses
(`train/loss`, `eval/eval_loss`, ...), plus the run's config once at the start and its sample answers
(samples.json) at the end. The run folder remains the record: a tracker that cannot start (package missing,
no credentials) is a warning, not a failed run.

Where they write, without a network:
    wandb    WANDB_MODE=offline (or `wandb offline`) keeps the run in output.dir/wandb, for `wandb sync` later;
             online, the project is train.tracker_project and the run name the output folder's name.
    mlflow   MLFLOW_TRACKING_URI if set, else a file store in output.dir/mlruns (`mlflow ui --backend-store-uri
             output.dir/mlruns`); the experiment is train.tracker_project. MLflow 3 keeps its file store in
             maintenance mode and asks for MLFLOW_ALLOW_FILE_STORE=true to use it: loratune sets that (for its own
             process) only when it picks the run folder's store itself.

A resumed run continues the same tracker run (its id is kept in output.dir/trackers.json). Steps replayed
after the checkpoint are logged again (wandb ignores steps it has already seen; MLflow keeps both values).
"""

from __future__ import annotations

import json
import logging
import os
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

log = logging.getLogger("loratune.train")

IDS_FILE = "trackers.json"
TRACKERS = ("wandb", "mlflow")


def scalars(row: Mapping[str, Any]) -> dict[str, float]:
    """A metrics row's numbers under TensorBoard's names (`train/...`, `eval/...`); step and epoch left out."""
    out = {}
    for key, value in row.items():
        if key in ("step", "epoch") or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        out[("eval/" if key.startswith(("eval", "benchmark")) else "train/") + key] = float(value)
    return out


def flatten(config: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """A nested config as `section.key: value` strings (MLflow's parameters are flat strings)."""
    out: dict[str, str] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            out.update(flatten(value, name + "."))
        else:
            out[name] = json.dumps(value) if isinstance(value, (list, dict, bool)) or value is None else str(value)
    return out


class Tracker(Protocol):
    def log(self, row: Mapping[str, Any]) -> None: ...

    def log_samples(self, samples: Sequence[Mapping[str, Any]]) -> None: ...

    def close(self) -> None: ...


def _ids(out: Path) -> dict[str, str]:
    try:
        return json.loads((out / IDS_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def _save_id(out: Path, name: str, run_id: str) -> None:
    ids = _ids(out)
    ids[name] = run_id
    (out / IDS_FILE).write_text(json.dumps(ids, indent=2) + "\n", encoding="utf-8")


class WandbTracker:
    """A wandb run: the config at start, each row with `step`, the samples as a table at the end."""

    def __init__(self, out: Path, config: Mapping[str, Any], project: str, resume: bool) -> None:
        import wandb

        run_id = _ids(out).get("wandb") if resume else None
        run_id = run_id or uuid.uuid4().hex[:8]
        self.wandb = wandb
        self.run = wandb.init(project=project, name=out.resolve().name, id=run_id, resume="allow", dir=str(out),
                              config=dict(config), reinit="create_new")
        _save_id(out, "wandb", run_id)

    def log(self, row: Mapping[str, Any]) -> None:
        values = scalars(row)
        if values:
            self.run.log(values, step=int(row["step"]))

    def log_samples(self, samples: Sequence[Mapping[str, Any]]) -> None:
        table = self.wandb.Table(columns=["prompt", "before", "after"],
                                 data=[[s.get("prompt"), s.get("before"), s.get("after")] for s in samples])
        self.run.log({"samples": table})

    def close(self) -> None:
        self.run.finish()


def local_store(out: Path) -> str:
    """The tracking URI of the run folder's own MLflow store (a file store: no database package needed)."""
    return (out / "mlruns").resolve().as_uri()


class MlflowTracker:
    """An MLflow run: the config as parameters (and as config.json), each row's metrics at its step, the samples as
    samples.json."""

    def __init__(self, out: Path, config: Mapping[str, Any], project: str, resume: bool) -> None:
        from mlflow import MlflowClient

        uri = os.environ.get("MLFLOW_TRACKING_URI")
        if not uri:
            uri = local_store(out)
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")  # see the module docstring
        self.client = MlflowClient(tracking_uri=uri)
        experiment = self.client.get_experiment_by_name(project)
        experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(project)
        run_id = _ids(out).get("mlflow") if resume else None
        if run_id is None:
            run_id = self.client.create_run(experiment_id, run_name=out.resolve().name).info.run_id
            params = flatten(config)
            from mlflow.entities import Param

            items = [Param(k, v[:6000]) for k, v in params.items()]
            for i in range(0, len(items), 100):
                self.client.log_batch(run_id, params=items[i:i + 100])
            self.client.log_dict(run_id, dict(config), "config.json")
        self.run_id, self.uri = run_id, uri
        _save_id(out, "mlflow", run_id)

    def log(self, row: Mapping[str, Any]) -> None:
        from mlflow.entities import Metric

        step = int(row["step"])
        metrics = [Metric(k, v, 0, step) for k, v in scalars(row).items()]
        if metrics:
            self.client.log_batch(self.run_id, metrics=metrics)

    def log_samples(self, samples: Sequence[Mapping[str, Any]]) -> None:
        self.client.log_dict(self.run_id, {"samples": list(samples)}, "samples.json")

    def close(self) -> None:
        self.client.set_terminated(self.run_id)


def open_trackers(names: Sequence[str], out: Path, config: Mapping[str, Any], project: str,
                  resume: bool) -> list[Tracker]:
    """The trackers `names` asks for (tensorboard is metrics.py's), each started or warned about."""
    opened: list[Tracker] = []
    for name in names:
        if name not in TRACKERS:
            continue
        cls = WandbTracker if name == "wandb" else MlflowTracker
        try:
            opened.append(cls(out, config, project, resume))
        except ImportError:
            log.warning("train.report_to has %s but the %s package is missing (pip install 'loratune[trackers]'); "
                        "not reported there", name, name)
        except Exception as e:  # noqa: BLE001 - a tracker that cannot start must not stop the run
            log.warning("train.report_to: %s could not start (%s); not reported there", name,
                        f"{type(e).__name__}: {e}".splitlines()[0])
    return opened
