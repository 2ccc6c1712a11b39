"""From per-item results to the report's data: summaries with intervals, differences, the judge tournament.

`run.py` computes and caches per-item results; this module only aggregates them (and asks the judge,
whose judgments are cached too), so a report can be rebuilt from the caches alone.
"""

from __future__ import annotations

import dataclasses
import os
import time
from pathlib import Path

from loratune import __version__
from loratune.eval import elo, generate, judge, mc, perplexity, plots
from loratune.eval.config import EvalConfig
from loratune.eval.inputs import Inputs
from loratune.eval.mcdata import Benchmark
from loratune.eval.models import Source
from loratune.eval.progress import bar
from loratune.eval.stats import paired_difference
from loratune.eval.store import ResultStore
from loratune.eval.textdata import TextItem


def tournament(cfg: EvalConfig, items: list[TextItem], template: str, answers: dict[str, dict[str, str]]) -> dict:
    """Judge every pair of the players' answers (cached per judgment) and rate the players."""
    j = cfg.judge
    players = j.models or [m.name for m in cfg.models]
    client = judge.JudgeClient(j.base_url, j.model or "", os.environ.get(j.api_key_env) or None, j.system,
                               j.temperature, j.max_tokens, j.timeout, j.retries)
    total = len(items) * len(players) * (len(players) - 1)
    with bar("judge", total) as b:
        judgments = judge.judge(client, template, items, answers, players,
                                ResultStore(Path(cfg.output.dir) / "cache" / "judge" / "judgments.jsonl"),
                                concurrency=j.concurrency, advance=b.advance)
    games = judge.games(judgments)
    return {"players": players, "prompts": len(items), "judge_model": j.model, "base_url": j.base_url, "k": j.elo_k,
            "initial": j.elo_initial, "orderings": j.orderings, "confidence": cfg.confidence, "games": len(games),
            "elo": elo.tournament(games, players, orderings=j.orderings, k=j.elo_k, initial=j.elo_initial,
                                  seed=cfg.seed, confidence=cfg.confidence),
            "win_rates": elo.win_rates(games, players), "position": judge.position_stats(judgments),
            "judgments": [dataclasses.asdict(x) for x in judgments]}


def _mc_report(cfg: EvalConfig, benchmarks: dict[str, Benchmark], results: dict, models: list[str]) -> dict:
    kw = dict(resamples=cfg.bootstrap, confidence=cfg.confidence, seed=cfg.seed)
    out = {}
    for t in cfg.mc:
        records = results[t.name]
        bench = benchmarks[t.name]
        per_model = {m: [mc.question_metrics(r, t.style) for r in records[m]] for m in models}
        diffs = {}
        for m in models[1:]:  # each model against the first, on the metrics both have
            shared = [k for k in mc.metrics_of(records[models[0]], t.style) if k in mc.metrics_of(records[m], t.style)]
            diffs[m] = {k: paired_difference([x[k] for x in per_model[models[0]]], [x[k] for x in per_model[m]],
                                             **kw).to_json() for k in shared}
        out[t.name] = {"path": t.path, "style": t.style, "shots": t.shots, "questions": len(bench.questions),
                       "subjects": len({q.subject for q in bench.questions}),
                       "models": {m: mc.summarize(records[m], t, **kw) for m in models}, "differences": diffs}
    return out


def build_report(cfg: EvalConfig, sources: list[Source], fingerprints: dict[str, str], inputs: Inputs, results: dict,
                 windows: dict[str, tuple[int, int]], judged: dict | None) -> dict:
    """The report as data: every model's numbers per task with counts and intervals, and the differences."""
    models = [m.name for m in cfg.models]
    kw = dict(resamples=cfg.bootstrap, confidence=cfg.confidence, seed=cfg.seed)
    src = {s.spec.name: s for s in sources}
    rep: dict = {
        "loratune": __version__, "created": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "confidence": cfg.confidence,
        "config": dataclasses.asdict(cfg),
        "models": [{"name": m, "path": src[m].spec.path, "kind": "adapter" if src[m].run else "model",
                    "base": src[m].base, "bits": src[m].bits, "fingerprint": fingerprints[m]} for m in models],
        "mc": _mc_report(cfg, inputs.mc, results["mc"], models), "generate": {}, "perplexity": {}}
    for g in cfg.generate:
        items = inputs.generate[g.name]
        rep["generate"][g.name] = {"path": g.path, **generate.summarize(
            items, {m: results["generate"][g.name][m] for m in models}, g.metrics, stemmer=g.rouge_stemmer,
            examples=cfg.output.examples, **kw)}
    for p in cfg.perplexity:
        recs = results["perplexity"][p.name]
        first = recs[models[0]]
        max_length, stride = windows[p.name]
        rep["perplexity"][p.name] = {"path": p.path, "documents": len(first), "max_length": max_length, "stride": stride,
                                     "models": {m: perplexity.summarize(recs[m], **kw) for m in models}}
    if judged:
        rep["judge"] = judged
    return rep


def draw_plots(cfg: EvalConfig, rep: dict, out: Path) -> list[str]:
    """The plots that help (per-category accuracy, Elo), next to the report; their file names."""
    made = []
    models = [m.name for m in cfg.models]
    for name, task in rep["mc"].items():
        if task["models"][models[0]]["categories"] and plots.mc_plot(name, task, models, out / f"mc_{name}.png"):
            made.append(f"mc_{name}.png")
    if rep.get("judge") and plots.elo_plot(rep["judge"], out / "elo.png"):
        made.append("elo.png")
    return made
