"""Everything an eval reads before a model loads: benchmarks, test sets, documents, judge prompts, preference pairs.

Reading all of it first means a malformed row anywhere (or a judge template without its placeholders)
fails in seconds, naming its file and row, rather than after an hour of scoring. The digest of each task's files is part of its cache key, so an edited
benchmark is scored again.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from loratune.eval import perplexity, reward
from loratune.eval.config import EvalConfig
from loratune.eval.judge import load_template
from loratune.eval.mcdata import Benchmark, load_benchmark
from loratune.eval.store import file_digest
from loratune.eval.textdata import TextItem, read_items


@dataclass
class Inputs:
    """Everything read before a model loads: benchmarks, test sets, documents, judge prompts, their digests."""

    mc: dict[str, Benchmark] = field(default_factory=dict)
    generate: dict[str, list[TextItem]] = field(default_factory=dict)
    perplexity: dict[str, list] = field(default_factory=dict)
    judge: list[TextItem] = field(default_factory=list)
    judge_template: str = ""
    reward: dict[str, reward.PairSet] = field(default_factory=dict)
    digests: dict[str, str] = field(default_factory=dict)


def _digest(files: list[Path], fallback: str) -> str:
    return file_digest(files) if files else fallback


def read_inputs(cfg: EvalConfig) -> Inputs:
    inp = Inputs()
    for t in cfg.mc:
        inp.mc[t.name] = load_benchmark(t)
        inp.digests[t.name] = _digest(inp.mc[t.name].files, t.path)
    for g in cfg.generate:
        inp.generate[g.name], files = read_items(g.path, fmt=g.format, columns=g.columns, split=g.split,
                                                 system=g.system, limit=g.limit, with_reference=True)
        inp.digests[g.name] = _digest(files, g.path)
    for p in cfg.perplexity:
        inp.perplexity[p.name], files = perplexity.read_documents(p.path, text_key=p.text_key, split=p.split, limit=p.limit)
        inp.digests[p.name] = _digest(files, p.path)
    for i, t in enumerate(cfg.reward):
        inp.reward[t.name] = reward.read_pairs(t, i)
        inp.digests[t.name] = _digest(inp.reward[t.name].files, t.path)
    if cfg.judge.prompts:
        j = cfg.judge
        inp.judge, files = read_items(j.prompts, fmt=j.format, columns=j.columns, limit=j.limit, with_reference=False)
        inp.digests["judge"] = _digest(files, j.prompts)
        inp.judge_template = load_template(j.template)
    return inp
