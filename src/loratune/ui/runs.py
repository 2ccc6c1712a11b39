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

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

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


def figure(curves: dict[str, list[dict]]) -> Figure | None:
    """The loss curves of one or more runs ({name: points of `metrics`}) as a matplotlib figure (train loss as a
    line, eval loss as dots), or None when there is no point yet. Drawn with matplotlib's object API, as
    loss.png is: Gradio's own line plot draws no line when it starts empty and gets colours later."""
    if not any(curves.values()):
        return None
    fig = Figure(figsize=(7, 3.4), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for name, points in curves.items():
        for series, style in (("loss", "-"), ("eval_loss", "o--")):
            xy = [(p["step"], p["loss"]) for p in points if p["series"] == series]
            if xy:
                label = f"{name} {'train' if series == 'loss' else 'eval'}" if name else series.replace("_", " ")
                ax.plot(*zip(*xy), style, label=label, linewidth=1.3, markersize=4)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    return fig


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
