"""Preference data: records -> (prompt, chosen, rejected) pairs or (prompt, completion, desirable) completions
-> samples whose labels cover the completion only, rendered by the same chat template machinery as SFT.

Accepted records (key names remappable per dataset with `columns`: prompt, chosen, rejected, completion, label,
role, content, system, tools):

- paired, explicit prompt: `prompt` a text or a message list; `chosen`/`rejected` each a text (the assistant's
  answer), a message list continuing the prompt, or a message list holding the prompt too (UltraFeedback
  binarized: `prompt` text, `chosen`/`rejected` = [user, assistant]);
- paired, no prompt: `chosen`/`rejected` whole conversations (message lists, or Anthropic HH text
  "\\n\\nHuman: ... \\n\\nAssistant: ..."); their longest shared leading run of messages is the prompt;
- unpaired (train.method kto): `prompt` (text or messages), `completion` (text or messages), `label` (true:
  desirable, false: undesirable).

Message lists are read as a `messages` record's list (role/content keys, or sharegpt's from/value, validated the
same way). After the prompt, each side must be exactly one assistant message (what the model is trained to prefer). Every
problem raises `DataError` naming the file, the row and the key; a pair whose two answers are the same (public
sets hold some) has nothing to prefer: it is dropped, counted (outcome `identical`) and reported in one warning.

Each side is rendered as prompt + answer with `train_on=last` (`loratune.data.render`: the labels of the final
assistant turn, end of turn included), and fitted to `data.max_length` as an SFT conversation is
(`loratune.data.lengths`); a pair loses both sides if either is dropped. A pair becomes one `PreferenceSample`:
chosen then rejected laid end to end with positions restarting at 0 (the layout of a packed row), so the loop's
batching keeps the two together, in one forward pass, with their boundaries; the objective
(`loratune.pref.objective`) reads the numbered supervised sequences of a batch as (chosen, rejected) in order.
A KTO sample is likewise the completion, then the same prompt with the completion of the previous record of the
dataset (cyclically): the mismatched pair from which KTO estimates its reference point, as TRL builds it.

The rendered and tokenized sides of a local dataset's records (before length limits) are cached as SFT's are
(`loratune.data.preference_cache`, with `data.cache`): a rerun with the same files, settings and tokenizer
does not tokenize again.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import random
import re
from dataclasses import dataclass
from pathlib import Path

from loratune.config import ColumnsConfig, DataConfig, DatasetConfig
from loratune.data import preference_cache
from loratune.data.formats import _conversation, _Row, _tools
from loratune.data.lengths import fit_conversation
from loratune.data.pipeline import PreparedData, _eval_holdout, _weighted
from loratune.data.readers import (
    Record,
    dataset_files,
    iter_file,
    iter_hub,
    looks_local,
)
from loratune.data.render import RenderError, encode, plan_conversation
from loratune.data.sample import Sample
from loratune.data.stats import DatasetStats, DataStats
from loratune.data.templates import ChatTemplate, resolve_template
from loratune.errors import DataError
from loratune.model.load import TokenizerInfo

log = logging.getLogger("loratune.data.pipeline")  # the data stage's log, as SFT's statistics go
HH_TURN = re.compile(r"(?:^|\n\n)(Human|Assistant):[ ]?")
PAIRED = ("dpo", "orpo", "simpo")


@dataclass
class PreferenceSample(Sample):
    """Two sequences in one row (positions restart at 0 at the second): chosen + rejected, or for KTO the
    completion + the mismatched completion; `desirable` is KTO's label (None for pairs)."""

    desirable: bool | None = None
    ref: tuple[float, float] | None = None  # the reference policy's log-probs of the two sequences, if precomputed


class SamePair(Exception):
    """A pair whose chosen and rejected answers are the same: nothing to prefer; dropped and counted."""


@dataclass
class Pair:
    prompt: list[dict]
    chosen: dict
    rejected: dict
    tools: list | None = None


@dataclass
class Unpaired:
    prompt: list[dict]
    completion: dict
    desirable: bool
    tools: list | None = None


# -------------------------------------------------------------------------------------------- records


def _hh(row: _Row, key: str, text: str) -> list[dict]:
    """Anthropic HH text ("\\n\\nHuman: ...\\n\\nAssistant: ...") as messages."""
    parts = HH_TURN.split(text)
    if len(parts) < 3 or parts[0].strip():
        row.fail(key, "expected a message list, or Anthropic HH text \"\\n\\nHuman: ...\\n\\nAssistant: ...\"")
    roles = {"Human": "user", "Assistant": "assistant"}
    messages = [{"role": roles[r], "content": c.strip()} for r, c in zip(parts[1::2], parts[2::2])]
    for i, m in enumerate(messages):
        if not m["content"]:
            row.fail(key, f"turn {i} ({parts[1 + 2 * i]}:) is empty; expected non-empty text in every turn")
    return messages


def _messages(row: _Row, name: str, role_of_text: str) -> list[dict]:
    """The value of key `name` as messages: a text is one `role_of_text` message (or HH text), a list is parsed
    and validated as a `messages` record's list."""
    key = row.key(name)
    value = row.get(name, "a text or a message list")
    if isinstance(value, str) and not value.lstrip().startswith("["):
        if not value.strip():
            row.fail(key, "empty text; expected non-empty text")
        if role_of_text == "assistant" and value.lstrip("\n").startswith("Human:"):
            return _hh(row, key, value)
        return [{"role": role_of_text, "content": value}]
    view = _Row(row.rec, dataclasses.replace(row.cols, messages=key, system="\0no system key"))
    first = value[0] if isinstance(value, list) and value and isinstance(value[0], dict) else {}
    sharegpt = "from" in first and "role" not in first  # sharegpt's keys (from/value), unless columns say otherwise
    role, content = ("from", "value") if sharegpt else ("role", "content")
    return _conversation(view, key, row.cols.role or role, row.cols.content or content).messages


def _shared(a: list[dict], b: list[dict]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def _with_system(prompt: list[dict], row: _Row, system: str | None) -> list[dict]:
    text = row.rec.data.get(row.key("system")) if isinstance(row.rec.data.get(row.key("system")), str) else None
    text = text or system
    if text and (not prompt or prompt[0]["role"] != "system"):
        return [{"role": "system", "content": text}, *prompt]
    return prompt


def _answer(row: _Row, key: str, rest: list[dict]) -> dict:
    if len(rest) != 1 or rest[0]["role"] != "assistant":
        got = ", ".join(m["role"] for m in rest) or "nothing"
        row.fail(key, f"after the prompt expected exactly one assistant message, got {got}")
    return rest[0]


def read_pair(rec: Record, columns: ColumnsConfig | None, system: str | None) -> Pair:
    """One paired preference record, normalised and validated (see the module docstring)."""
    row = _Row(rec, columns)
    chosen, rejected = _messages(row, "chosen", "assistant"), _messages(row, "rejected", "assistant")
    if row.has("prompt"):
        prompt = _messages(row, "prompt", "user")
        chosen = chosen if chosen[0]["role"] != "assistant" else prompt + chosen
        rejected = rejected if rejected[0]["role"] != "assistant" else prompt + rejected
    n = _shared(chosen, rejected)
    if n == len(chosen) and n == len(rejected):
        raise SamePair(f"{rec.source}: row {rec.row}")
    n = min(n, len(chosen) - 1, len(rejected) - 1)
    prompt = chosen[:n]
    if not prompt:
        row.fail(row.key("chosen"), "no prompt: expected a `prompt` key, or chosen/rejected conversations that "
                                    "begin with the same messages")
    pair = Pair(_with_system(prompt, row, system), _answer(row, row.key("chosen"), chosen[n:]),
                _answer(row, row.key("rejected"), rejected[n:]), _tools(row))
    if pair.chosen == pair.rejected:
        raise SamePair(f"{rec.source}: row {rec.row}")
    return pair


def read_unpaired(rec: Record, columns: ColumnsConfig | None, system: str | None) -> Unpaired:
    """One KTO record: prompt, completion and its desirable label."""
    row = _Row(rec, columns)
    prompt = _messages(row, "prompt", "user")
    completion = _messages(row, "completion", "assistant")
    if completion[0]["role"] != "assistant":  # the completion holds the prompt too
        n = _shared(prompt, completion)
        if n != len(prompt):
            row.fail(row.key("completion"), f"neither an answer nor a conversation beginning with '{row.key('prompt')}'")
        completion = completion[n:]
    label = row.get("label", "true (desirable) or false (undesirable)")
    if not isinstance(label, bool):
        row.fail(row.key("label"), f"expected true (desirable) or false (undesirable), got {label!r}")
    return Unpaired(_with_system(prompt, row, system), _answer(row, row.key("completion"), completion), label,
                    _tools(row))


def read_records(ds: DatasetConfig, streaming: bool = False):
    """The raw records of a dataset (a file, a folder of files, or a hub dataset), in order."""
    if Path(ds.path).exists():
        return itertools.chain.from_iterable(iter_file(f) for f in dataset_files(ds.path))
    if looks_local(ds.path):
        raise DataError(f"{ds.path}: no such file or folder")
    return iter_hub(ds.path, ds.split, streaming)


# -------------------------------------------------------------------------------------------- samples


def _render(prompt: list[dict], answer: dict, tools: list | None, where: str, template: ChatTemplate, tokenizer,
            info: TokenizerInfo) -> tuple[list[int], list[int]]:
    """(ids, labels) of prompt + answer, labels on the answer (its final assistant turn), before length limits."""
    try:
        plan = plan_conversation([*prompt, answer], template, tokenizer, "last", tools)
        return encode([plan], tokenizer, info)[0]
    except RenderError as e:
        raise DataError(f"{where}: {e}") from None


def _fit(side: tuple[list[int], list[int]], cfg: DataConfig,
         info: TokenizerInfo) -> tuple[tuple[list[int], list[int]] | None, str]:
    """A rendered side fitted to the length limits as an SFT conversation is (None if dropped); the outcome."""
    kept, outcome = fit_conversation(side[0], side[1], cfg, info.bos_id)
    return (kept[0] if kept else None), outcome


def _side(prompt: list[dict], answer: dict, tools: list | None, where: str, template: ChatTemplate, tokenizer,
          info: TokenizerInfo, cfg: DataConfig) -> tuple[tuple[list[int], list[int]] | None, str]:
    """((ids, labels) of prompt + answer fitted to the length limits, or None if dropped; the outcome)."""
    return _fit(_render(prompt, answer, tools, where, template, tokenizer, info), cfg, info)


def pair_sample(pair: Pair, where: str, template: ChatTemplate, tokenizer, info: TokenizerInfo,
                cfg: DataConfig) -> tuple[PreferenceSample | None, str]:
    """One pair as training lays it out (chosen then rejected, fitted to `cfg`'s length limits), or None when
    either side is dropped; and the outcome (ok, truncated, or why it was dropped)."""
    sides = [_side(pair.prompt, answer, pair.tools, where, template, tokenizer, info, cfg)
             for answer in (pair.chosen, pair.rejected)]
    stats = DataStats()
    sample = _keep(*sides, None, DatasetStats(where, "preference pairs"), stats)
    return sample, next(iter(stats.outcomes))


def _keep(a: tuple, b: tuple, desirable: bool | None, d: DatasetStats, stats: DataStats) -> PreferenceSample | None:
    """The sample of two fitted sides (as `_side` returns them), or None when either was dropped; counted."""
    (first, out_a), (second, out_b) = a, b
    dropped = [o for s, o in ((first, out_a), (second, out_b)) if s is None]
    outcome = dropped[0] if dropped else "truncated" if "truncated" in (out_a, out_b) else "ok"
    stats.outcomes[outcome] += 1
    d.outcomes[outcome] += 1
    if dropped:
        return None
    return PreferenceSample(first[0] + second[0], first[1] + second[1],
                            list(range(len(first[0]))) + list(range(len(second[0]))), desirable)


def _rendered(ds: DatasetConfig, cfg: DataConfig, method: str, template: ChatTemplate, tokenizer,
              info: TokenizerInfo) -> preference_cache.Rendered:
    """One dataset's records read, validated, rendered and tokenized (both sides of each), before length limits."""
    records = read_records(ds, cfg.streaming)
    if ds.max_samples:
        records = itertools.islice(records, ds.max_samples)
    out = preference_cache.Rendered([], [], [])

    def render(prompt, answer, tools, where):
        return _render(prompt, answer, tools, where, template, tokenizer, info)

    if method == "kto":
        items = [(r, read_unpaired(r, ds.columns, ds.system)) for r in records]
        for k, (r, u) in enumerate(items):
            where = f"{r.source}: row {r.row}"
            mismatched = items[k - 1][1].completion  # the previous record's (the last one's for the first)
            out.sides.append((render(u.prompt, u.completion, u.tools, where), render(u.prompt, mismatched, u.tools, where)))
            out.desirable.append(u.desirable)
        return out
    for r in records:
        try:
            p = read_pair(r, ds.columns, ds.system)
        except SamePair as e:  # public sets hold some (Anthropic HH): dropped, counted and reported
            out.identical.append(str(e))
            out.sides.append(None)
        else:
            where = f"{r.source}: row {r.row}"
            out.sides.append((render(p.prompt, p.chosen, p.tools, where), render(p.prompt, p.rejected, p.tools, where)))
        out.desirable.append(None)
    return out


def _cached_rendering(ds: DatasetConfig, cfg: DataConfig, method: str, template: ChatTemplate, tokenizer,
                      info: TokenizerInfo) -> tuple[preference_cache.Rendered, bool]:
    """`_rendered`, from the tokenization cache when it holds it (local files, data.cache on); whether it did."""
    files = dataset_files(ds.path) if cfg.cache and Path(ds.path).exists() else None
    if files is None:
        return _rendered(ds, cfg, method, template, tokenizer, info), False
    k = preference_cache.key(files, ds, "kto" if method == "kto" else "pairs", template, tokenizer, info)
    hit = preference_cache.load(k)
    if hit is not None:
        return hit, True
    rendered = _rendered(ds, cfg, method, template, tokenizer, info)
    preference_cache.save(k, rendered)
    return rendered, False


def _dataset(ds: DatasetConfig, cfg: DataConfig, method: str, template: ChatTemplate, tokenizer,
             info: TokenizerInfo, stats: DataStats) -> tuple[list[PreferenceSample | None], DatasetStats]:
    """One dataset's samples in record order (None where a record was dropped) and its statistics."""
    d = DatasetStats(ds.path, "kto (prompt, completion, label)" if method == "kto" else "preference pairs")
    rendered, d.cached = _cached_rendering(ds, cfg, method, template, tokenizer, info)
    out: list[PreferenceSample | None] = []
    for sides, desirable in zip(rendered.sides, rendered.desirable):
        if sides is None:  # a pair whose answers are the same
            d.outcomes["identical"] += 1
            stats.outcomes["identical"] += 1
            out.append(None)
        else:
            out.append(_keep(_fit(sides[0], cfg, info), _fit(sides[1], cfg, info), desirable, d, stats))
    if rendered.identical:
        log.warning("%s: %d pairs dropped: their chosen and rejected answers are the same (first: %s)", ds.path,
                    len(rendered.identical), rendered.identical[0])
    d.records = len(out)
    if not out:
        raise DataError(f"{ds.path}: no records; expected at least one")
    return out, d


def prepare_preference_data(cfg: DataConfig, tokenizer, info: TokenizerInfo, seed: int, method: str,
                            log_stats: bool = True) -> PreparedData:
    """Training and eval samples of a preference method (`method`: dpo, orpo, simpo or kto)."""
    if not cfg.datasets:
        raise DataError("data.datasets is empty: list at least one dataset of preference records")
    template = resolve_template(cfg.template, tokenizer, cfg.template_variables)
    stats = DataStats(template=template.name)
    groups = []
    for ds in cfg.datasets:
        samples, d = _dataset(ds, cfg, method, template, tokenizer, info, stats)
        groups.append(samples)
        stats.datasets.append(d)
    held = _eval_holdout([[[s] if s is not None else [] for s in g] for g in groups], cfg, seed)
    rng = random.Random(f"loratune-mix:{seed}")
    train: list[Sample] = []
    evals: list[Sample] = []
    for ds, d, g, h in zip(cfg.datasets, stats.datasets, groups, held):
        kept = [s for j, s in enumerate(g) if s is not None and j not in h]
        held_out = [g[j] for j in sorted(h)]
        mixed = _weighted(kept, ds.weight, rng)
        d.samples, d.eval, d.mixed = len(kept) + len(held_out), len(held_out), len(mixed)
        train += mixed
        evals += held_out
    for ds in cfg.eval_datasets:
        samples, d = _dataset(ds, cfg, method, template, tokenizer, info, stats)
        kept = [s for s in samples if s is not None]
        d.samples = d.eval = len(kept)
        stats.eval_datasets.append(d)
        evals += kept
    if not train:
        raise DataError("no preference samples left for training after length limits and drops "
                        f"({', '.join(f'{k} {v}' for k, v in stats.outcomes.items())})")
    stats.train_samples, stats.eval_samples, stats.rows = len(train), len(evals), len(train)
    stats.lengths = [len(s.input_ids) for s in train]
    stats.tokens = sum(stats.lengths)
    stats.supervised = sum(sum(1 for x in s.labels if x != -100) for s in train)
    for line in stats.lines() if log_stats else []:
        log.info("data: %s", line)
    return PreparedData(train, evals, template, stats)
