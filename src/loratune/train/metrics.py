"""The run's record: `metrics.jsonl`, optional TensorBoard, and `loss.png`.

`metrics.jsonl` holds one JSON object per line: training rows (`step`, `epoch`, `loss`, `lr`,
`grad_norm`, `tokens_per_s`, `memory_gib`, `skipped`) every `log_every` steps, and evaluation rows
(`step`, `eval_loss`) at each evaluation. A resumed run first cuts the file back to the checkpoint's
step, so the steps replayed after the checkpoint are not recorded twice; TensorBoard is told the same
through `purge_step`.

`loss.png` is drawn with matplotlib's object API on the Agg canvas (no pyplot, no global backend
switch, no display needed). Without matplotlib the plot is skipped with one note.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

log = logging.getLogger("loratune.train")

METRICS_FILE = "metrics.jsonl"
PLOT_FILE = "loss.png"
TENSORBOARD_DIR = "tensorboard"


def read_rows(path: Path) -> list[dict]:
    """The rows of a metrics file; a torn last line (the process was killed mid-write) is ignored."""
    rows = []
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                rows.append(json.loads(line))
            except ValueError:
                continue
    return rows


def _clean(value: object) -> object:
    """NaN/inf are not JSON: write them as null."""
    return None if isinstance(value, float) and not math.isfinite(value) else value


class MetricsLog:
    """Append-only metrics for one run, continued exactly from a checkpoint's step when resuming."""

    def __init__(self, out: Path, tensorboard: bool, resume_step: int | None) -> None:
        self.path = out / METRICS_FILE
        kept = [r for r in read_rows(self.path) if r.get("step", 0) <= resume_step] if resume_step is not None else []
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in kept), encoding="utf-8")
        tmp.replace(self.path)  # a kill now leaves the old file or the new one, never a torn one
        self.writer = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                log.warning("train.tensorboard is on but the tensorboard package is missing "
                            "(pip install tensorboard); TensorBoard logs skipped")
            else:
                purge = resume_step + 1 if resume_step is not None else None
                self.writer = SummaryWriter(str(out / TENSORBOARD_DIR), purge_step=purge)

    def write(self, row: dict) -> None:
        row = {k: _clean(v) for k, v in row.items()}
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")
        if self.writer is not None:
            step = row["step"]
            for key, value in row.items():
                if key not in ("step", "epoch") and isinstance(value, (int, float)) and not isinstance(value, bool):
                    self.writer.add_scalar(("eval/" if key.startswith("eval") else "train/") + key, value, step)
            self.writer.flush()

    def rows(self) -> list[dict]:
        return read_rows(self.path)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def plot_losses(rows: list[dict], path: Path) -> str | None:
    """Draw train and eval loss against the step into `path`; returns a note instead if it cannot."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        return "loss.png skipped: matplotlib is not installed (pip install matplotlib)"
    train = [(r["step"], r["loss"]) for r in rows if r.get("loss") is not None]
    evals = [(r["step"], r["eval_loss"]) for r in rows if r.get("eval_loss") is not None]
    if not train and not evals:
        return None
    fig = Figure(figsize=(7, 4), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    if train:
        ax.plot(*zip(*train), label="train loss", linewidth=1.2)
    if evals:
        ax.plot(*zip(*evals), "o-", label="eval loss", linewidth=1.5, markersize=4)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (mean per supervised token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp)
    tmp.replace(path)
    return None
