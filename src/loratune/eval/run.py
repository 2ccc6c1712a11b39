"""`loratune eval`: every task on every model, one loaded base at a time, then one report.

    read every benchmark, test set and prompt file first (inputs.py: a malformed row fails before any load)
    for each group of models sharing a base (models.plan):
        load it; for each model: mc, generate, perplexity, judge answers   (each cached per item)
        release it
    for each reward model of the reward tasks: load it, score its pairs, release it   (reward.py, cached per pair)
    judge every pair of answers (cached per judgment), Elo over random orderings   (assemble.py)
    report.json + report.md (+ plots)                                              (report.py, plots.py)

Nothing is recomputed that the output folder's cache already holds for the same model files, task
settings and data bytes: a stopped eval, run again, continues; an eval with one more model computes
only that model's results.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import yaml

from loratune.eval import assemble, generate, mc, perplexity, report, reward
from loratune.eval.config import EvalConfig, GenerateTaskConfig, JudgeConfig, MCTaskConfig, PerplexityTaskConfig
from loratune.eval.inputs import Inputs, read_inputs
from loratune.eval.models import Loaded, Source, fingerprint, load, plan, release, scoring
from loratune.eval.progress import bar
from loratune.eval.store import ResultStore, store_for, write_text_atomic
from loratune.eval.store import fingerprint as key_of
from loratune.eval.textdata import TextItem
from loratune.infer.sampling import SamplingParams

log = logging.getLogger("loratune.eval")

FORMAT = 2  # of the cached results; bump when their meaning changes


# Settings that select items or only shape the report: a cached per-item result stays valid across them.
NOT_IN_KEY = {"name", "limit", "subjects", "categories", "metrics", "rouge_stemmer"}


def _settings(task) -> dict:
    """The task settings a per-item result depends on (part of its cache key)."""
    return {k: v for k, v in dataclasses.asdict(task).items() if k not in NOT_IN_KEY}


def _context_length(folder: str) -> int | None:
    """The context length the engine will have (its config's max_position_embeddings, else 4096), read from the
    base's config.json without loading it; None when there is no local config.json."""
    config = Path(folder) / "config.json"
    if not config.is_file():
        return None
    return int(json.loads(config.read_text(encoding="utf-8")).get("max_position_embeddings") or 4096)


@dataclass
class Job:
    """One task on one model: its cache, the item ids it must hold, how to compute them, where the result goes."""

    section: str  # mc, generate, perplexity or judge
    task: str
    model: str
    store: ResultStore
    ids: list[str]
    compute: Callable[[Loaded], object]  # fills the store; returns the result
    result: Callable[[], object]  # the result, from a complete store

    def complete(self) -> bool:
        return all(i in self.store for i in self.ids)


class Runner:
    """Runs the tasks of one eval config; keeps every model's per-item results for the report."""

    def __init__(self, cfg: EvalConfig, inputs: Inputs) -> None:
        self.cfg, self.inputs = cfg, inputs
        self.out = Path(cfg.output.dir)
        self.results: dict[str, dict[str, dict[str, object]]] = {"mc": {}, "generate": {}, "perplexity": {}, "judge": {}}
        self.sources: list[Source] = []
        self.fingerprints: dict[str, str] = {}
        self.windows: dict[str, tuple[int, int]] = {}  # perplexity task -> (max_length, stride) used
        self.fingerprints_reward: dict[str, dict[str, str]] = {}  # reward task -> reward model -> fingerprint

    @property
    def answers(self) -> dict[str, dict[str, str]]:
        """The judge players' answers: model -> item id -> text."""
        return self.results["judge"].get("answers", {})  # type: ignore[return-value]

    def store(self, model: str, task: str, *parts) -> ResultStore:
        code = [self.cfg.implementation] if self.cfg.implementation else []  # (numbers differ by rounding)
        return store_for(self.out, model, task, key_of(FORMAT, self.fingerprints[model], *parts, *code))

    def run_models(self) -> None:
        """Each group of models: from the cache when it holds everything, else loaded and computed."""
        for group in plan(self.cfg.models):
            for src in group:
                self.sources.append(src)
                self.fingerprints[src.spec.name] = fingerprint(src)
            context = _context_length(group[0].base)
            jobs = [j for s in group for j in self.jobs(s.spec.name, context)] if context else []
            if jobs and all(j.complete() for j in jobs):
                log.info("%s: every result is in the cache; not loading", ", ".join(s.spec.name for s in group))
                for j in jobs:
                    self._keep(j, j.result())
                continue
            log.info("loading %s", ", ".join(f"{s.spec.name} ({s.spec.path})" for s in group))
            loaded = load(group, self.cfg.implementation)
            try:
                for src in group:
                    for j in self.jobs(src.spec.name, loaded.engine.context_length):
                        self._keep(j, j.compute(loaded))
            finally:
                release(loaded)

    def _keep(self, job: Job, result: object) -> None:
        if job.section == "judge":
            self.results["judge"].setdefault("answers", {})[job.model] = result  # type: ignore[index]
        else:
            self.results[job.section].setdefault(job.task, {})[job.model] = result

    def jobs(self, model: str, context: int) -> list[Job]:
        out = [self.mc_job(model, t, context) for t in self.cfg.mc]
        out += [self.generate_job(model, g) for g in self.cfg.generate]
        out += [self.perplexity_job(model, p, context) for p in self.cfg.perplexity]
        j = self.cfg.judge
        if j.prompts and model in (j.models or [m.name for m in self.cfg.models]):
            out.append(self.judge_job(model, j))
        return out

    def mc_job(self, model: str, t: MCTaskConfig, context: int) -> Job:
        bench = self.inputs.mc[t.name]
        max_length = t.max_length or context
        store = self.store(model, t.name, _settings(t), self.inputs.digests[t.name], max_length)
        ids = [q.id for q in bench.questions]

        def compute(loaded: Loaded) -> list[dict]:
            engine, name = loaded.engine, loaded.names[model]
            prepared = mc.prepare(bench, t, engine.format(name).tokenizer, max_length)
            with bar(f"{t.name} · {model}", len(ids), sum(i in store for i in ids)) as b, scoring(loaded, model) as net:
                return mc.score_questions(net, prepared, t.style, batch_size=self.cfg.batch_size, store=store,
                                          advance=b.advance)

        return Job("mc", t.name, model, store, ids, compute, lambda: [store.get(i) for i in ids])

    def _answers_job(self, section: str, task: str, model: str, items: list[TextItem], chat: bool,
                     params: SamplingParams, store: ResultStore) -> Job:
        ids = [it.id for it in items]

        def compute(loaded: Loaded) -> dict[str, dict]:
            with bar(f"{task} · {model}", len(ids), sum(i in store for i in ids)) as b:
                return generate.generate_answers(loaded.engine, loaded.names[model], items, chat=chat, params=params,
                                                 batch_size=self.cfg.batch_size, store=store, advance=b.advance)

        return Job(section, task, model, store, ids, compute, lambda: {i: store.get(i) for i in ids})

    def generate_job(self, model: str, g: GenerateTaskConfig) -> Job:
        params = SamplingParams(max_new_tokens=g.max_new_tokens, temperature=g.temperature, top_p=g.top_p,
                                seed=g.seed, stop=tuple(g.stop)).validate()
        sampled = {"batch_size": self.cfg.batch_size} if g.temperature > 0 else {}  # a batch draws together
        store = self.store(model, g.name, _settings(g), self.inputs.digests[g.name], sampled)
        return self._answers_job("generate", g.name, model, self.inputs.generate[g.name], g.chat, params, store)

    def judge_job(self, model: str, j: JudgeConfig) -> Job:
        params = SamplingParams(max_new_tokens=j.answer_max_new_tokens, temperature=j.answer_temperature,
                                seed=j.answer_seed).validate()
        sampled = {"batch_size": self.cfg.batch_size} if j.answer_temperature > 0 else {}
        store = self.store(model, "judge-answers", params.max_new_tokens, params.temperature, params.seed,
                           self.inputs.digests["judge"], sampled)
        job = self._answers_job("judge", "judge answers", model, self.inputs.judge, True, params, store)
        compute, result = job.compute, job.result
        job.compute = lambda loaded: {k: v["answer"] for k, v in compute(loaded).items()}  # type: ignore[union-attr]
        job.result = lambda: {k: v["answer"] for k, v in result().items()}  # type: ignore[union-attr]
        return job

    def perplexity_job(self, model: str, p: PerplexityTaskConfig, context: int) -> Job:
        docs = self.inputs.perplexity[p.name]
        max_length = p.max_length or min(context, 4096)
        stride = p.stride or max_length
        self.windows.setdefault(p.name, (max_length, stride))
        store = self.store(model, p.name, _settings(p), self.inputs.digests[p.name], max_length, stride)
        ids = [d.id for d in docs]

        def compute(loaded: Loaded) -> list[dict]:
            engine, name = loaded.engine, loaded.names[model]
            with bar(f"{p.name} · {model}", len(ids), sum(i in store for i in ids)) as b, scoring(loaded, model) as net:
                return perplexity.score_documents(net, engine.format(name).tokenizer, docs, max_length=max_length,
                                                  stride=stride, batch_size=self.cfg.batch_size, store=store,
                                                  advance=b.advance)

        return Job("perplexity", p.name, model, store, ids, compute, lambda: [store.get(i) for i in ids])


def run_eval(cfg: EvalConfig) -> dict:
    """Run every task of `cfg` on every model and write the report; returns the report as data."""
    out = Path(cfg.output.dir)
    inputs = read_inputs(cfg)
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out / "eval.yaml", yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False, allow_unicode=True))
    runner = Runner(cfg, inputs)
    runner.run_models()
    if cfg.reward:  # reward models: loaded as training built them, one at a time (eval/reward.py)
        runner.results["reward"], runner.fingerprints_reward = reward.run_tasks(cfg, inputs.reward, inputs.digests)
    judged = assemble.tournament(cfg, inputs.judge, inputs.judge_template, runner.answers) if cfg.judge.prompts else None
    rep = assemble.build_report(cfg, runner.sources, runner.fingerprints, inputs, runner.results, runner.windows, judged)
    if cfg.reward:
        rep["reward"] = reward.report(cfg, inputs.reward, runner.results["reward"], runner.fingerprints_reward)
    if cfg.output.plots:
        rep["plots"] = assemble.draw_plots(cfg, rep, out)
    js, md = report.write(out, rep)
    log.info("report: %s (and %s)", md, js.name)
    return rep
