"""The run's record: the reported train loss, `metrics.jsonl`, optional TensorBoard, and `loss.png`.

The train loss is reported one way everywhere (the progress bar and log lines, `metrics.jsonl`,
`loss.png`, the end-of-run summary, the model card): `Window.loss()`, the mean loss per supervised token
over the last `train.log_every` optimizer steps (fewer at the very start), i.e. the summed token losses
of those steps divided by their supervised tokens. Tokens/s is smoothed over the same window: the real
tokens of those steps divided by their training time. The window's entries live in the loop state, so a
resumed run reports exactly what the uninterrupted run would have.

`metrics.jsonl` holds one JSON object per line: training rows (`step`, `epoch`, `loss`, `lr`,
`grad_norm`, `tokens` (supervised tokens trained on so far), `tokens_per_s`, `memory_gib`, `skipped`)
every `log_every` steps and at the last step (a preference method adds its step's `rewards_chosen`,
`rewards_rejected`, `margin`, `accuracy`, `logps_chosen`, `logps_rejected`; `loratune.pref.objective`), and
evaluation rows (`step`, `eval_loss`, a preference method's metrics prefixed `eval_`) at each evaluation,
and benchmark rows (`step`, `benchmark` (its
name), `benchmark_acc`, `benchmark_acc_norm`, `benchmark_acc_letter`, `benchmark_answer_logprob`, `benchmark_n`) where train.eval_benchmark
scores one (`loss.png` shows its accuracy on a second axis). A resumed run first cuts the file back to the
checkpoint's step, so the steps replayed after the checkpoint are not recorded twice; TensorBoard is
told the same through `purge_step`.

`loss.png` is drawn with matplotlib's object API on the Agg canvas (no pyplot, no global backend
switch, no display needed); a preference run's gets a second panel: rewards, margin and pairwise accuracy. Without matplotlib the plot is skipped with one note.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Sequence
from pathlib import Path

from loratune.train.trackers import Tracker

log = logging.getLogger("loratune.train")

METRICS_FILE = "metrics.jsonl"
PLOT_FILE = "loss.png"
TENSORBOARD_DIR = "tensorboard"


def read_json_file(path: Path) -> dict:
    """A JSON object from `path`; {} if it is missing or unreadable."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


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


class Window:
    """The last `size` optimizer steps, as [summed token loss, supervised tokens, real tokens, seconds] each.

    `entries` is the list it keeps them in (the loop state's, so that checkpoints carry it); a skipped step
    (non-finite loss) enters with no loss and no supervised tokens, but with its tokens and time.
    """

    def __init__(self, size: int, entries: list[list[float]] | None = None) -> None:
        self.size = max(1, size)
        self.entries = entries if entries is not None else []
        del self.entries[:-self.size]  # train.log_every may have been lowered since the checkpoint

    def add(self, loss_sum: float, tokens: int, input_tokens: int, seconds: float) -> None:
        finite = math.isfinite(loss_sum) and tokens > 0
        self.entries.append([loss_sum if finite else 0.0, tokens if finite else 0, input_tokens, seconds])
        del self.entries[:-self.size]

    def span(self, step: int) -> list[int]:
        """[first, last] optimizer step the window covers when `step` is its newest."""
        return [step - len(self.entries) + 1, step]

    def loss(self) -> float | None:
        """Mean loss per supervised token over the window; None if no step in it had a finite loss."""
        tokens = sum(e[1] for e in self.entries)
        return sum(e[0] for e in self.entries) / tokens if tokens else None

    def tokens_per_s(self) -> float:
        """Real (non-padding) tokens processed per second of training over the window."""
        seconds = sum(e[3] for e in self.entries)
        return sum(e[2] for e in self.entries) / seconds if seconds > 0 else 0.0


def span_text(steps: list[int] | None) -> str:
    """'steps 11-20' (or 'step 20') for a window's [first, last] step."""
    if not steps or len(steps) != 2:
        return "?"
    return f"step {steps[1]}" if steps[0] == steps[1] else f"steps {steps[0]}-{steps[1]}"


class MetricsLog:
    """Append-only metrics for one run, continued exactly from a checkpoint's step when resuming."""

    def __init__(self, out: Path, tensorboard: bool, resume_step: int | None, trackers: Sequence[Tracker] = ()) -> None:
        self.path, self.out, self.trackers = out / METRICS_FILE, out, list(trackers)  # wandb, mlflow (trackers.py)
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
                    group = "eval/" if key.startswith(("eval", "benchmark")) else "train/"
                    self.writer.add_scalar(group + key, value, step)
            self.writer.flush()
        for tracker in self.trackers:
            tracker.log(row)

    def rows(self) -> list[dict]:
        return read_rows(self.path)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        samples = read_json_file(self.out / "samples.json").get("samples") or []
        for tracker in self.trackers:
            if any(s.get("after") is not None for s in samples):  # a finished run's answers
                tracker.log_samples(samples)
            tracker.close()
        self.trackers = []


def plot_losses(rows: list[dict], path: Path) -> str | None:
    """Draw train and eval loss (and a benchmark's accuracy) against the step into `path`; returns a note instead
    if it cannot."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        return "loss.png skipped: matplotlib is not installed (pip install matplotlib)"
    train = [(r["step"], r["loss"]) for r in rows if r.get("loss") is not None]
    evals = [(r["step"], r["eval_loss"]) for r in rows if r.get("eval_loss") is not None]
    bench = [(r["step"], r["benchmark_acc"]) for r in rows if r.get("benchmark_acc") is not None]
    if not train and not evals and not bench:
        return None
    rewards = _preference_series(rows)
    fig = Figure(figsize=(7, 6.5 if rewards else 4), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(2, 1, 1) if rewards else fig.add_subplot()
    if train:
        ax.plot(*zip(*train), label="train loss", linewidth=1.2)
    if evals:
        ax.plot(*zip(*evals), "o-", label="eval loss", linewidth=1.5, markersize=4)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (mean per pair)" if rewards else "loss (mean per supervised token)")
    ax.grid(alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()
    if bench:  # train.eval_benchmark's accuracy, on its own axis
        right = ax.twinx()
        name = next(r.get("benchmark") for r in reversed(rows) if r.get("benchmark_acc") is not None)
        right.plot(*zip(*bench), "s--", color="tab:green", label=f"{name} accuracy", linewidth=1.2, markersize=4)
        right.set_ylabel("benchmark accuracy")
        right.set_ylim(0.0, 1.0)
        more = right.get_legend_handles_labels()
        handles, labels = handles + more[0], labels + more[1]
    ax.legend(handles, labels)
    if rewards:
        _plot_preference(fig.add_subplot(2, 1, 2), rewards)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp)
    tmp.replace(path)
    return None


PREFERENCE_SERIES = (("rewards_chosen", "reward chosen"), ("rewards_rejected", "reward rejected"),
                     ("margin", "margin"), ("accuracy", "accuracy"))


def _preference_series(rows: list[dict]) -> dict[str, list[tuple[int, float]]]:
    """A preference run's rewards, margin and accuracy (train and eval_), by metric; empty for other runs."""
    out = {}
    for key, _ in PREFERENCE_SERIES:
        for name in (key, f"eval_{key}"):
            points = [(r["step"], r[name]) for r in rows if r.get(name) is not None]
            if points:
                out[name] = points
    return out


def _plot_preference(ax, series: dict[str, list[tuple[int, float]]]) -> None:
    """Rewards and margin (left axis) and pairwise accuracy (right axis, 0 to 1) against the step."""
    for key, label in PREFERENCE_SERIES[:3]:
        for name, style, what in ((key, "-", "train"), (f"eval_{key}", "o--", "eval")):
            if name in series:
                ax.plot(*zip(*series[name]), style, label=f"{what} {label}", linewidth=1.2, markersize=4)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("reward (beta x log-ratio)")
    ax.grid(alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()
    if "accuracy" in series or "eval_accuracy" in series:
        right = ax.twinx()
        for name, style, what in (("accuracy", ":", "train"), ("eval_accuracy", "s:", "eval")):
            if name in series:
                right.plot(*zip(*series[name]), style, color="tab:gray", label=f"{what} accuracy", markersize=4)
        right.set_ylabel("pairwise accuracy")
        right.set_ylim(0.0, 1.0)
        more = right.get_legend_handles_labels()
        handles, labels = handles + more[0], labels + more[1]
    if handles:
        ax.legend(handles, labels, fontsize="small")
