"""The multiple-choice benchmark scored during training (`train.eval_benchmark`), as the QLoRA paper scored MMLU.

The training run owns when (`due`); this module owns what: the benchmark is read and tokenized once, when the
run is set up (a malformed file fails before any training), and each evaluation scores the model being
trained, as it is in memory (loratune's decoder or the transformers + peft model), with the same code as
`loratune eval` (`loratune.eval.mc`): same prompts, same truncation, same scoring. So the accuracies written
at a step are the ones `loratune eval` gives for the adapter saved at that step. Scoring draws no random
numbers, so exact resume is kept.

`train.eval_benchmark` is a small section of the training config (`loratune.config.BenchmarkEvalConfig`);
`task_of` turns it into the eval package's `MCTaskConfig`.
"""

from __future__ import annotations

import dataclasses

import torch

from loratune.config import BenchmarkEvalConfig
from loratune.errors import ConfigError
from loratune.eval.config import MCColumnsConfig, MCTaskConfig
from loratune.eval.mc import evaluate_prepared, prepare
from loratune.eval.mcdata import load_benchmark

PREFIX = "benchmark_"  # of the accuracy keys in metrics.jsonl (`benchmark_acc`, ...); `benchmark`: its name


def task_of(b: BenchmarkEvalConfig) -> MCTaskConfig:
    """The eval package's task for the training config's benchmark section."""
    if b.path is None:
        raise ConfigError("train.eval_benchmark.path is not set")
    known = {f.name for f in dataclasses.fields(MCColumnsConfig)}
    unknown = sorted(set(b.columns) - known)
    if unknown:
        raise ConfigError(f"train.eval_benchmark.columns: unknown key(s) {unknown}; expected some of {sorted(known)}")
    return MCTaskConfig(name=b.name, path=b.path, split=b.split, dev_split=b.dev_split, hub_config=b.hub_config,
                        format=b.format, columns=MCColumnsConfig(**b.columns), shots=b.shots, style=b.style,
                        limit=b.limit, max_length=b.max_length)


class TrainingBenchmark:
    """One benchmark, read and tokenized once; `run(model)` scores it -> a metrics row (without its step)."""

    def __init__(self, cfg: BenchmarkEvalConfig, tokenizer, context_length: int) -> None:
        self.cfg, self.task = cfg, task_of(cfg)
        self.max_length = cfg.max_length or context_length
        bench = load_benchmark(self.task)
        self.prepared = prepare(bench, self.task, tokenizer, self.max_length)
        self.n = len(self.prepared)

    def due(self, step: int, *, eval_every: int, saving: bool) -> bool:
        """At `every` steps; with every 0, when the eval loss is (train.eval_every, else at checkpoints)."""
        every = self.cfg.every or eval_every
        return step % every == 0 if every else saving

    @torch.no_grad()
    def run(self, model: torch.nn.Module) -> dict:
        scores = evaluate_prepared(model, self.prepared, self.task.style, batch_size=self.cfg.batch_size)
        row: dict = {"benchmark": self.cfg.name}
        row.update({PREFIX + k: v for k, v in scores.items()})
        return row

    def describe(self) -> str:
        return (f"{self.cfg.name}: {self.n} questions, {self.cfg.shots}-shot, {self.cfg.style} "
                f"({self.cfg.path}, split {self.cfg.split})")


def rows_of(rows: list[dict]) -> list[dict]:
    """The benchmark rows of a metrics log."""
    return [r for r in rows if PREFIX + "acc" in r]


def summary_of(rows: list[dict]) -> dict | None:
    """{name, n, first: {step, acc, ...}, last: {...}} of a metrics log's benchmark rows (None without any)."""
    bench = rows_of(rows)
    if not bench:
        return None

    def scores(r: dict) -> dict:
        return {"step": r["step"], **{k[len(PREFIX):]: v for k, v in r.items()
                                      if k.startswith(PREFIX) and k != PREFIX + "n"}}

    return {"name": bench[-1].get("benchmark"), "n": bench[-1].get(PREFIX + "n"), "first": scores(bench[0]),
            "last": scores(bench[-1])}
