"""The data stage: config -> training and eval samples (token ids + labels), with statistics.

    files / folders / hub  --readers-->  records  --formats-->  conversations or texts
        --render (chat template, labels from rendering)-->  (ids, labels)      [cached per dataset]
        --lengths (truncation, chunking, drops, all counted)-->  samples
        --eval split (whole records, seeded) / weights (seeded)-->  --packing (optional)-->  PreparedData

Records are streamed and tokenized in windows, so raw text never sits in memory all at once; large
datasets are rendered and tokenized by a pool of processes (`data.num_proc`). Every choice that involves
chance (eval hold-out, fractional weights) is seeded by `seed`, so a rerun gives the same samples.
"""

from __future__ import annotations

import itertools
import logging
import multiprocessing
import os
import random
from collections.abc import Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from loratune.config import DataConfig, DatasetConfig
from loratune.data import cache
from loratune.data.formats import Example, Normaliser
from loratune.data.lengths import Pair, fit, has_targets
from loratune.data.packing import efficiency, pack
from loratune.data.readers import Record, dataset_files, iter_file, iter_hub, looks_local
from loratune.data.render import RenderError, encode, plan_conversation, plan_text
from loratune.data.sample import Sample
from loratune.data.stats import DatasetStats, DataStats
from loratune.data.templates import ChatTemplate, resolve_template
from loratune.errors import DataError
from loratune.model.load import TokenizerInfo

__all__ = ["Sample", "PreparedData", "DataStats", "prepare_data", "tokenize_dataset"]

log = logging.getLogger(__name__)

WINDOW = 16384  # records normalised, then tokenized, at a time
CHUNK = 1024  # records per tokenizer call / per worker task
AUTO_PARALLEL = 16384  # with num_proc 0, datasets at least this large use several processes


@dataclass
class PreparedData:
    train: list[Sample]
    eval: list[Sample]  # empty when there is no eval split
    template: ChatTemplate  # the template used; saved with the adapter
    stats: DataStats


# ----------------------------------------------------------------------------------------- tokenizing

Item = tuple[str, int, Example]  # (source, row, example)
_WORKER: dict = {}


def _tokenize_items(items: list[Item], template: ChatTemplate, tokenizer, info: TokenizerInfo,
                    train_on: str) -> list[tuple[list[int], list[int], bool]]:
    plans = []
    for source, row, ex in items:
        try:
            plans.append(plan_text(ex.text, tokenizer) if ex.text is not None
                         else plan_conversation(ex.messages, template, tokenizer, train_on, ex.tools))
        except RenderError as e:
            raise DataError(f"{source}: row {row}: {e}") from None
    try:
        pairs = encode(plans, tokenizer, info)
    except RenderError:  # find the record at fault to name it
        for (source, row, _), plan in zip(items, plans):
            try:
                encode([plan], tokenizer, info)
            except RenderError as e:
                raise DataError(f"{source}: row {row}: {e}") from None
        raise
    return [(ids, labels, ex.text is not None) for (ids, labels), (_, _, ex) in zip(pairs, items)]


def _init_worker(template: ChatTemplate, tokenizer, info: TokenizerInfo, train_on: str) -> None:
    _WORKER.update(template=template, tokenizer=tokenizer, info=info, train_on=train_on)


def _worker(items: list[Item]) -> list[tuple[list[int], list[int], bool]]:
    return _tokenize_items(items, **_WORKER)


def _records(ds: DatasetConfig, streaming: bool) -> tuple[Iterator[Record], list[Path] | None]:
    if Path(ds.path).exists():
        files = dataset_files(ds.path)
        return itertools.chain.from_iterable(iter_file(f) for f in files), files
    if looks_local(ds.path):
        raise DataError(f"{ds.path}: no such file or folder")
    return iter_hub(ds.path, ds.split, streaming), None


def _windows(items: Iterable[Item], size: int) -> Iterator[list[Item]]:
    it = iter(items)
    while window := list(itertools.islice(it, size)):
        yield window


def tokenize_dataset(ds: DatasetConfig, cfg: DataConfig, template: ChatTemplate, tokenizer,
                     info: TokenizerInfo) -> tuple[cache.Tokenized, DatasetStats]:
    """Read, normalise, render and tokenize one dataset (from the cache when possible)."""
    records, files = _records(ds, cfg.streaming)
    stats = DatasetStats(ds.path, ds.format)
    k = None
    if cfg.cache and files is not None:
        k = cache.key(files, ds, template, cfg.train_on, cache.tokenizer_fingerprint(tokenizer, info))
        hit = cache.load(k)
        if hit is not None:
            stats.records, stats.cached, stats.format = hit.records, True, hit.fmt
            return hit, stats
    if ds.max_samples:
        records = itertools.islice(records, ds.max_samples)
    normalise = Normaliser(ds.format, ds.columns, ds.system)
    items = ((r.source, r.row, normalise(r)) for r in records)
    out = cache.Tokenized([], [], [], 0)
    pool = None
    try:
        for window in _windows(items, WINDOW):
            procs = cfg.num_proc or (min(os.cpu_count() or 1, 8) if len(window) >= AUTO_PARALLEL else 1)
            chunks = [window[i:i + CHUNK] for i in range(0, len(window), CHUNK)]
            if procs > 1 and len(chunks) > 1:
                pool = pool or ProcessPoolExecutor(procs, mp_context=multiprocessing.get_context("spawn"),
                                                   initializer=_init_worker,
                                                   initargs=(template, tokenizer, info, cfg.train_on))
                results = pool.map(_worker, chunks)
            else:
                results = (_tokenize_items(c, template, tokenizer, info, cfg.train_on) for c in chunks)
            for triple in itertools.chain.from_iterable(results):
                out.ids.append(triple[0])
                out.labels.append(triple[1])
                out.is_text.append(triple[2])
            out.records += len(window)
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)
    if out.records == 0:
        raise DataError(f"{ds.path}: no records; expected at least one")
    stats.records = out.records
    stats.format = out.fmt = ", ".join(sorted({f for f, _ in normalise.detected.values()})) or ds.format
    if k is not None:
        cache.save(k, out)
    return out, stats


# ------------------------------------------------------------------------------------------ assembling


def _fitted(tok: cache.Tokenized, cfg: DataConfig, info: TokenizerInfo, stats: DataStats,
            ds_stats: DatasetStats) -> list[list[Pair]]:
    """Length limits per record; returns each record's resulting samples (empty when dropped)."""
    groups = []
    for ids, labels, is_text in zip(tok.ids, tok.labels, tok.is_text):
        pieces, outcome = fit(ids, labels, is_text, cfg, info.bos_id)
        stats.outcomes[outcome] += 1
        ds_stats.outcomes[outcome] += 1
        ds_stats.no_target += not has_targets(labels)
        groups.append(pieces)
    _check_supervised(ds_stats, cfg)
    return groups


def _check_supervised(ds: DatasetStats, cfg: DataConfig) -> None:
    """A dataset none of whose records keeps a token to learn from is a mistake (usually no assistant turn,
    or the wrong format or data.train_on), never something to train on silently: name it and say why."""
    n = ds.outcomes["no_supervised"]
    if n == 0 or n != ds.records:
        return
    why = []
    if ds.no_target:
        why.append(f"{ds.no_target} have no assistant turn to learn from (data.train_on={cfg.train_on})")
    if n > ds.no_target:
        why.append(f"{n - ds.no_target} lost theirs to data.max_length={cfg.max_length}")
    raise DataError(f"{ds.path}: none of its {n} records has a token to train on: {', '.join(why)}; expected "
                    "conversations with an assistant reply, e.g. {\"messages\": [{\"role\": \"user\", ...}, "
                    "{\"role\": \"assistant\", ...}]}")


def _eval_holdout(groups: list[list[list[Pair]]], cfg: DataConfig, seed: int) -> list[set[int]]:
    """Which records of each dataset are held out: whole records, so no text is in both splits."""
    pool = [(d, j) for d, g in enumerate(groups) for j, pieces in enumerate(g) if pieces]
    chosen: list[set[int]] = [set() for _ in groups]
    if cfg.eval_split <= 0:
        return chosen
    n = max(1, round(cfg.eval_split * len(pool))) if cfg.eval_split < 1 else int(cfg.eval_split)
    if n >= len(pool):
        raise DataError(f"data.eval_split {cfg.eval_split:g} holds out {n} of the {len(pool)} usable records, "
                        "leaving none to train on; lower it")
    for i in random.Random(f"loratune-eval:{seed}").sample(range(len(pool)), n):
        d, j = pool[i]
        chosen[d].add(j)
    return chosen


def _weighted(pairs: list[Pair], weight: float, rng: random.Random) -> list[Pair]:
    """round(weight x n) samples: whole copies, then a seeded random subset for the fraction."""
    if weight == 1.0 or not pairs:
        return pairs
    copies, extra = divmod(round(weight * len(pairs)), len(pairs))
    return pairs * copies + [pairs[i] for i in sorted(rng.sample(range(len(pairs)), extra))]


def _describe_empty(stats: DataStats) -> str:
    """Why no training sample is left, dataset by dataset (all-unsupervised ones were named earlier)."""
    def dropped(d: DatasetStats) -> str:
        counts = [f"{d.outcomes[k]} {k.replace('_', ' ')}" for k in ("too_long", "no_supervised") if d.outcomes[k]]
        return f"{d.records} records, dropped: {', '.join(counts) or 'none'}"

    per = "; ".join(f"{d.path}: {dropped(d)}" for d in stats.datasets)
    return f"no training samples left after length limits and drops ({per or 'nothing read'})"


def prepare_data(cfg: DataConfig, tokenizer, info: TokenizerInfo, seed: int, log_stats: bool = True) -> PreparedData:
    """Build the training and eval samples the config describes (see the module docstring); the statistics
    go to the log unless `log_stats` is false (the preview prints them itself)."""
    if not cfg.datasets:
        raise DataError("data.datasets is empty: list at least one dataset, e.g. `- path: train.jsonl`")
    template = resolve_template(cfg.template, tokenizer, cfg.template_variables)
    stats = DataStats(template=template.name)
    groups = []
    for ds in cfg.datasets:
        tok, ds_stats = tokenize_dataset(ds, cfg, template, tokenizer, info)
        groups.append(_fitted(tok, cfg, info, stats, ds_stats))
        stats.datasets.append(ds_stats)
    held = _eval_holdout(groups, cfg, seed)
    rng = random.Random(f"loratune-mix:{seed}")
    train_pairs: list[Pair] = []
    eval_pairs: list[Pair] = []
    for ds, ds_stats, g, h in zip(cfg.datasets, stats.datasets, groups, held):
        train = [p for j, pieces in enumerate(g) if j not in h for p in pieces]
        evals = [p for j in sorted(h) for p in g[j]]
        mixed = _weighted(train, ds.weight, rng)
        ds_stats.samples, ds_stats.eval, ds_stats.mixed = len(train) + len(evals), len(evals), len(mixed)
        train_pairs += mixed
        eval_pairs += evals
    for ds in cfg.eval_datasets:
        tok, ds_stats = tokenize_dataset(ds, cfg, template, tokenizer, info)
        evals = [p for pieces in _fitted(tok, cfg, info, stats, ds_stats) for p in pieces]
        ds_stats.samples = ds_stats.eval = len(evals)
        stats.eval_datasets.append(ds_stats)
        eval_pairs += evals
    if not train_pairs:
        raise DataError(_describe_empty(stats))
    train = pack(train_pairs, cfg.max_length) if cfg.pack else [Sample(ids, labels) for ids, labels in train_pairs]
    stats.train_samples, stats.eval_samples, stats.rows = len(train_pairs), len(eval_pairs), len(train)
    stats.lengths = [len(ids) for ids, _ in train_pairs]
    stats.tokens = sum(stats.lengths)
    stats.supervised = sum(sum(1 for x in labels if x != -100) for _, labels in train_pairs)
    stats.packing_efficiency = efficiency(train, cfg.max_length) if cfg.pack else None
    for line in stats.lines() if log_stats else []:
        log.info("data: %s", line)
    return PreparedData(train, [Sample(ids, labels) for ids, labels in eval_pairs], template, stats)
