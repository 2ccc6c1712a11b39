"""train.report_to: wandb (offline) and MLflow (a local file store) get exactly metrics.jsonl's rows, the config
and the sample answers; a missing package or a tracker that cannot start is a warning, not a failed run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from train_helpers import write_run_yaml

from loratune.train.trackers import flatten, local_store, scalars


def test_scalars_use_tensorboards_names() -> None:
    row = {"step": 3, "epoch": 0.5, "loss": 1.25, "lr": 1e-3, "skipped": 0, "eval_loss": 2.0, "benchmark": "mmlu",
           "benchmark_acc": 0.5, "ok": True}
    assert scalars(row) == {"train/loss": 1.25, "train/lr": 1e-3, "train/skipped": 0.0, "eval/eval_loss": 2.0,
                            "eval/benchmark_acc": 0.5}


def test_flatten() -> None:
    assert flatten({"a": {"b": 1, "c": [1, 2], "d": None, "e": {}}, "f": True}) == {
        "a.b": "1", "a.c": "[1, 2]", "a.d": "null", "a.e": "{}", "f": "true"}


@pytest.fixture
def finished_run(tmp_path: Path, tiny_llama: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    pytest.importorskip("wandb")
    pytest.importorskip("mlflow")
    from loratune.cli import main

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    path = write_run_yaml(tmp_path, tiny_llama,
                          train={"max_steps": 3, "save_every": 0, "report_to": ["wandb", "mlflow", "tensorboard"],
                                 "tracker_project": "tiny"},
                          output={"dir": str(tmp_path / "out"), "overwrite": True, "sample_prompts": ["Who are you?"],
                                  "sample_max_new_tokens": 4})
    assert main(["train", str(path)]) == 0
    return tmp_path / "out"


def _rows(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


def test_wandb_and_mlflow_log_the_metrics_rows(finished_run: Path) -> None:
    from mlflow import MlflowClient
    from wandb_log import read_run

    out = finished_run
    rows = _rows(out)
    want = {(r["step"], name): value for r in rows for name, value in scalars(r).items()}
    assert any(name == "train/loss" for _, name in want) and any(name == "eval/eval_loss" for _, name in want)
    ids = json.loads((out / "trackers.json").read_text())

    # wandb: the offline run's records
    history, config = read_run(next((out / "wandb").glob(f"offline-run-*-{ids['wandb']}")))
    got = {(h["_step"], k): v for h in history for k, v in h.items() if k.startswith(("train/", "eval/"))}
    assert got == pytest.approx(want)
    assert config["train"]["max_steps"] == 3 and config["adapter"]["rank"] == 4
    assert config["train"]["report_to"] == ["wandb", "mlflow", "tensorboard"]
    assert any("samples/nrows" in h and h["samples/nrows"] == 1 for h in history)

    # mlflow: the run folder's own store
    client = MlflowClient(tracking_uri=local_store(out))
    run = client.get_run(ids["mlflow"])
    got = {(m.step, name): m.value for name in run.data.metrics for m in client.get_metric_history(run.info.run_id, name)}
    assert got == pytest.approx(want)
    assert run.data.params["train.max_steps"] == "3" and run.data.params["adapter.rank"] == "4"
    assert run.info.status == "FINISHED"
    experiment = client.get_experiment(run.info.experiment_id)
    assert experiment.name == "tiny"
    samples = json.loads(Path(client.download_artifacts(run.info.run_id, "samples.json", str(out.parent))).read_text())
    assert samples["samples"][0]["prompt"] == "Who are you?" and samples["samples"][0]["after"] is not None
    assert any((out / "tensorboard").iterdir())


def test_a_tracker_that_cannot_start_is_a_warning(tmp_path: Path, tiny_llama: Path, monkeypatch: pytest.MonkeyPatch,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    pytest.importorskip("mlflow")
    from loratune.cli import main

    monkeypatch.setenv("MLFLOW_TRACKING_URI", "unknown-scheme://nowhere")
    path = write_run_yaml(tmp_path, tiny_llama, train={"max_steps": 1, "save_every": 0, "report_to": ["mlflow"]})
    with caplog.at_level("WARNING"):
        assert main(["train", str(path)]) == 0
    assert "mlflow could not start" in caplog.text
    assert _rows(tmp_path / "out")
