"""Run folders of the workspace, read back for the UI: which there are, their state, config, curves, samples.

A run folder is what `loratune train` writes (docs/design.md): `metrics.jsonl` while it trains, then the
adapter, `loratune.yaml`, `samples.json`, `loss.png` and the model card. A folder is a run when it holds
`metrics.jsonl` or `adapter_config.json`; they are found by walking the workspace (hidden folders, the
checkpoints inside runs and symbolic links are not entered). Nothing here writes.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from loratune.train.metrics import read_rows
from loratune.ui.paths import Workspace

MAX_DEPTH = 4
MARKERS = ("metrics.jsonl", "adapter_config.json")


@dataclass(frozen=True)
class RunInfo:
    name: str  # relative to the workspace
    path: Path
    has_adapter: bool
    step: int | None
    loss: float | None


def find_runs(ws: Workspace, limit: int = 200) -> list[RunInfo]:
    """Run folders inside the workspace, by name."""
    runs = []
    for folder, dirs, names in os.walk(ws.root, followlinks=False):
        depth = len(Path(folder).relative_to(ws.root).parts)
        dirs[:] = [] if depth >= MAX_DEPTH else sorted(d for d in dirs if not d.startswith(".") and d != "checkpoints")
        if any(m in names for m in MARKERS):
            runs.append(run_info(ws, Path(folder)))
            if len(runs) >= limit:
                break
    return sorted(runs, key=lambda r: r.name)


def run_info(ws: Workspace, folder: Path) -> RunInfo:
    rows = [r for r in read_rows(folder / "metrics.jsonl") if "loss" in r]
    last = rows[-1] if rows else {}
    return RunInfo(ws.relative(folder), folder, (folder / "adapter_config.json").is_file(), last.get("step"),
                   last.get("loss"))


def metrics(folder: Path) -> list[dict]:
    """Rows of metrics.jsonl as (run-less) points: one per train loss and per eval loss."""
    points = []
    for row in read_rows(folder / "metrics.jsonl"):
        for key in ("loss", "eval_loss"):
            if isinstance(row.get(key), (int, float)) and "step" in row:
                points.append({"step": row["step"], "loss": float(row[key]), "series": key})
    return points


def frame(points: list[dict], color: str = "series") -> pd.DataFrame:
    """Points as the loss plot takes them: numeric step and loss (an empty frame too: the plot takes the axis
    types from the first frame it gets, and an empty frame of objects would make them categories)."""
    return pd.DataFrame({"step": pd.Series([p["step"] for p in points], dtype="int64"),
                         "loss": pd.Series([p["loss"] for p in points], dtype="float64"),
                         color: pd.Series([p[color] for p in points], dtype="object")})


def config_text(folder: Path) -> str:
    path = folder / "loratune.yaml"
    return path.read_text(encoding="utf-8") if path.is_file() else ""


def samples(folder: Path) -> list[dict]:
    """samples.json as a list of {prompt, before, after} (whatever of those the file has)."""
    path = folder / "samples.json"
    if not path.is_file():
        return []
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except ValueError:
        return []
    items = data.get("samples", data) if isinstance(data, dict) else data
    return [s for s in items if isinstance(s, dict)] if isinstance(items, list) else []
