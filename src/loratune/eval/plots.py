"""Plots next to the report, where a picture says more than the table: Elo ratings with their intervals,
and multiple-choice accuracy per category for each model. Drawn with matplotlib's non-interactive backend;
skipped (with a note in the log) when matplotlib is missing."""

from __future__ import annotations

import logging
from pathlib import Path

log = logging.getLogger(__name__)


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.info("matplotlib is not installed: no plots")
        return None
    return plt


def elo_plot(judge: dict, path: Path) -> bool:
    plt = _pyplot()
    if plt is None:
        return False
    players = sorted(judge["players"], key=lambda p: judge["elo"][p]["mean"])
    means = [judge["elo"][p]["mean"] for p in players]
    err = [[m - judge["elo"][p]["low"] for p, m in zip(players, means)],
           [judge["elo"][p]["high"] - m for p, m in zip(players, means)]]
    fig, ax = plt.subplots(figsize=(6, 0.6 * len(players) + 1.5))
    ax.errorbar(means, range(len(players)), xerr=err, fmt="o", capsize=4)
    ax.set_yticks(range(len(players)), players)
    ax.set_xlabel(f"Elo ({judge['confidence']:.0%} interval over {judge['orderings']} orderings)")
    ax.axvline(judge["initial"], color="grey", linewidth=0.5)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def mc_plot(name: str, task: dict, models: list[str], path: Path) -> bool:
    """Grouped bars: accuracy per category (and overall) per model, with the intervals."""
    plt = _pyplot()
    if plt is None:
        return False
    metric = next(iter(task["models"][models[0]]["metrics"]))
    groups = [*task["models"][models[0]]["categories"], "all"]
    fig, ax = plt.subplots(figsize=(1.2 * len(groups) * max(1, len(models)) / 2 + 3, 4))
    width = 0.8 / len(models)
    for i, m in enumerate(models):
        ests = [task["models"][m]["categories"][g][metric] if g != "all" else task["models"][m]["metrics"][metric]
                for g in groups]
        values = [e["value"] for e in ests]
        err = [[v - (e["ci"][0] if e["ci"][0] is not None else v) for v, e in zip(values, ests)],
               [(e["ci"][1] if e["ci"][1] is not None else v) - v for v, e in zip(values, ests)]]
        ax.bar([g + i * width for g in range(len(groups))], values, width, yerr=err, capsize=3, label=m)
    ax.set_xticks([g + width * (len(models) - 1) / 2 for g in range(len(groups))], groups, rotation=20)
    ax.set_ylabel(metric)
    ax.set_ylim(0, 1)
    ax.set_title(name)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True
