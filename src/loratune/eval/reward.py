"""`loratune eval` reward tasks: the pairwise accuracy of reward models (train.method rm runs) on held-out pairs,
and of policies (dpo, kto, simpo, orpo, sft runs) by the implicit reward their training reports
(`loratune.pref.scoring`: for DPO, beta x the log-ratio of the policy to its base, the adapter disabled).

    read the pairs before any model loads (inputs.py: a malformed row, or a model folder that is no reward
        model, fails at once); pairs whose two answers are the same are counted and left out
    for each reward model (loaded once for every task that lists it, as training built it: pref/scoring.py)
        each pair rendered and fitted as training does (data/preference.pair_sample; a pair the length limits
        drop is recorded as dropped), scored in batches of `batch_size` pairs, each batch's rewards appended to
        the task's cache (store.py) before the next: a stopped eval continues, a finished one loads nothing
    summaries: accuracy (the share of pairs whose chosen answer gets the higher reward; a tie counts as wrong,
        as training's eval_accuracy counts it) with its Wilson interval, the mean margin r(chosen) - r(rejected)
        with a bootstrap interval, ties, truncated and dropped pairs, each model's accuracy difference to the
        first (paired bootstrap over the pairs both scored), and examples: the most confident right and wrong
        pairs (largest and most negative margins)
"""

from __future__ import annotations

import gc
import itertools
import logging
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from loratune.config import DatasetConfig
from loratune.data.preference import Pair, SamePair, pair_sample, read_pair, read_records
from loratune.data.readers import dataset_files
from loratune.errors import ConfigError, DataError
from loratune.eval.config import EvalConfig, EvalModelConfig, RewardModelConfig, RewardTaskConfig
from loratune.eval.progress import bar
from loratune.eval.stats import mean_ci, paired_difference, wilson
from loratune.eval.store import ResultStore, store_for
from loratune.eval.store import fingerprint as key_of
from loratune.pref.scoring import RewardScorer, reward_kind

log = logging.getLogger("loratune.eval")

FORMAT = 1  # of the cached per-pair rewards; bump when their meaning changes


@dataclass(frozen=True)
class PairItem:
    """One held-out pair and where it came from (its id: source and row)."""

    id: str
    source: str
    row: int
    pair: Pair


@dataclass
class PairSet:
    """A reward task's pairs, the number left out because both answers were the same, and the files read."""

    items: list[PairItem]
    identical: int
    files: list[Path]


def read_pairs(t: RewardTaskConfig, index: int) -> PairSet:
    """The task's pairs, validated as training validates them; its reward models checked to be reward models."""
    for j, m in enumerate(t.models):
        run_config(m, f"reward.{index}.models.{j}.path")
    ds = DatasetConfig(path=t.path, columns=t.columns, split=t.split, system=t.system)
    records = read_records(ds)
    if t.limit:
        records = itertools.islice(records, t.limit)
    items, identical = [], 0
    for r in records:
        try:
            items.append(PairItem(f"{r.source}:{r.row}", r.source, r.row, read_pair(r, t.columns, t.system)))
        except SamePair:
            identical += 1
    if not items:
        raise DataError(f"{t.path}: no preference pairs to score" + (f" ({identical} have the same chosen and "
                                                                      "rejected answers)" if identical else ""))
    return PairSet(items, identical, dataset_files(t.path) if Path(t.path).exists() else [])


def run_config(m: RewardModelConfig, key: str = "path"):
    """The training config of a scored run; a `ConfigError` naming `key` unless it is a `loratune train` output
    folder (a reward model with its head, or a policy)."""
    from loratune.config import load_config
    from loratune.model.load import resolve_model_path
    from loratune.pref.reward import HEAD_FILE
    from loratune.train.run_folder import CONFIG_FILE

    folder = Path(resolve_model_path(m.path))
    if not (folder / CONFIG_FILE).is_file():
        raise ConfigError(f"{key}: {m.path} is no run to score: expected the output folder of `loratune train` (a "
                          f"reward model of train.method rm, or a policy), holding {CONFIG_FILE}")
    cfg = load_config(folder / CONFIG_FILE)
    if cfg.train.method == "rm" and not (folder / HEAD_FILE).is_file():
        raise ConfigError(f"{key}: {m.path} is a reward model (train.method rm) without its {HEAD_FILE}")
    return cfg


def model_fingerprint(m: RewardModelConfig) -> str:
    """What a reward model's scores depend on (its run folder's files, its base): `eval.models.fingerprint`."""
    from loratune.eval.models import describe, fingerprint

    return fingerprint(describe(EvalModelConfig(name=m.name, path=m.path)))


def _settings(t: RewardTaskConfig) -> dict:
    return {"columns": t.columns, "split": t.split, "system": t.system}


def score_pairs(scorer, items: list[PairItem], store: ResultStore, batch_size: int, advance=lambda n: None) -> None:
    """Reward every pair of `items` not yet in `store` (chosen, rejected), appending a batch at a time."""
    todo, dropped = [], []
    for it in (x for x in items if x.id not in store):
        sample, outcome = pair_sample(it.pair, f"{it.source}: row {it.row}", scorer.template, scorer.tokenizer,
                                      scorer.info, scorer.cfg.data)
        if sample is None:
            dropped.append({"id": it.id, "dropped": outcome})
        else:
            todo.append((it, sample, outcome == "truncated"))
    store.add(dropped)
    advance(len(dropped))
    for start in range(0, len(todo), batch_size):
        chunk = todo[start:start + batch_size]
        rewards = scorer.rewards([s for _, s, _ in chunk], batch_size)
        store.add([{"id": it.id, "chosen": rewards[2 * k], "rejected": rewards[2 * k + 1], "truncated": cut}
                   for k, (it, _, cut) in enumerate(chunk)])
        advance(len(chunk))


def run_tasks(cfg: EvalConfig, pairs: dict[str, PairSet], digests: dict[str, str]) -> tuple[dict, dict]:
    """Every reward task on each of its reward models, each model loaded once (or not at all when the cache holds
    all its results). Returns ({task: {model: [record per pair]}}, {task: {model: fingerprint}})."""
    out = Path(cfg.output.dir)
    by_path: dict[str, list[tuple[RewardTaskConfig, RewardModelConfig, ResultStore]]] = {}
    prints: dict[str, dict[str, str]] = {}
    for t in cfg.reward:
        for m in t.models:
            fp = prints.setdefault(t.name, {})[m.name] = model_fingerprint(m)
            store = store_for(out, m.name, f"reward-{t.name}", key_of(FORMAT, fp, _settings(t), digests[t.name]))
            by_path.setdefault(m.path, []).append((t, m, store))
    results: dict[str, dict[str, list[dict]]] = {t.name: {} for t in cfg.reward}
    for path, jobs in by_path.items():
        if any(it.id not in store for t, _, store in jobs for it in pairs[t.name].items):
            log.info("loading reward model %s", path)
            scorer = RewardScorer.load(path)
            try:
                for t, m, store in jobs:
                    items = pairs[t.name].items
                    with bar(f"{t.name} · {m.name}", len(items), sum(it.id in store for it in items)) as b:
                        score_pairs(scorer, items, store, cfg.batch_size, b.advance)
            finally:
                del scorer
                gc.collect()
        else:
            log.info("reward model %s: every result is in the cache; not loading", path)
        for t, m, store in jobs:
            results[t.name][m.name] = [store.get(it.id) for it in pairs[t.name].items]
    return results, prints


def _text(message: dict) -> str:
    return str(message.get("content") or "")


def _example(it: PairItem, rec: dict) -> dict:
    prompt = "\n".join(f"{m['role']}: {_text(m)}" for m in it.pair.prompt)
    return {"id": it.id, "source": it.source, "row": it.row, "prompt": prompt, "chosen": _text(it.pair.chosen),
            "rejected": _text(it.pair.rejected), "reward_chosen": rec["chosen"], "reward_rejected": rec["rejected"],
            "margin": rec["chosen"] - rec["rejected"]}


def summarize(items: list[PairItem], records: list[dict], *, examples: int, resamples: int, confidence: float,
              seed: int) -> dict:
    """One reward model on one pair set: accuracy, margin, ties, truncated and dropped pairs, examples."""
    scored = [(it, r) for it, r in zip(items, records) if "chosen" in r]
    margins = [r["chosen"] - r["rejected"] for _, r in scored]
    hits = sum(m > 0 for m in margins)
    order = sorted(range(len(scored)), key=lambda i: margins[i])
    return {"pairs": len(scored), "correct": hits, "ties": sum(m == 0 for m in margins),
            "truncated": sum(bool(r.get("truncated")) for _, r in scored),
            "dropped": dict(Counter(r["dropped"] for r in records if "dropped" in r)),
            "accuracy": wilson(hits, len(scored), confidence).to_json(),
            "margin": mean_ci(margins, resamples=resamples, confidence=confidence, seed=seed).to_json(),
            "mean_reward_chosen": sum(r["chosen"] for _, r in scored) / len(scored) if scored else None,
            "mean_reward_rejected": sum(r["rejected"] for _, r in scored) / len(scored) if scored else None,
            "examples": {"right": [_example(*scored[i]) for i in reversed(order) if margins[i] > 0][:examples],
                         "wrong": [_example(*scored[i]) for i in order if margins[i] <= 0][:examples]}}


def report(cfg: EvalConfig, pairs: dict[str, PairSet], results: dict, prints: dict) -> dict:
    """The reward tasks' part of report.json: per task, each model's summary and its difference to the first."""
    kw = dict(resamples=cfg.bootstrap, confidence=cfg.confidence, seed=cfg.seed)
    out = {}
    for t in cfg.reward:
        items, recs = pairs[t.name].items, results[t.name]
        names = [m.name for m in t.models]
        diffs = {}
        for other in names[1:]:  # on the pairs both scored
            both = [(a, b) for a, b in zip(recs[names[0]], recs[other]) if "chosen" in a and "chosen" in b]
            diffs[other] = {"accuracy": paired_difference([float(a["chosen"] > a["rejected"]) for a, _ in both],
                                                          [float(b["chosen"] > b["rejected"]) for _, b in both],
                                                          **kw).to_json()}
        out[t.name] = {"path": t.path, "records": len(items) + pairs[t.name].identical, "identical": pairs[t.name].identical,
                       "models": {m.name: {"path": m.path, "fingerprint": prints[t.name][m.name],
                                           "reward": reward_kind(run_config(m)),
                                           **summarize(items, recs[m.name], examples=cfg.output.examples, **kw)}
                                  for m in t.models},
                       "differences": diffs}
    return out
