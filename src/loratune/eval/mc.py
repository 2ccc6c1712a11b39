"""Multiple-choice evaluation: score every question's choices, then accuracies per subject, category and overall.

Per question, every choice is scored by its log-likelihood as the continuation of the prompt (on loratune's
decoder by `loratune.eval.decoder_loglik`, on a transformers model by `loratune.eval.loglik`: `scorer_for`),
giving three accuracies:

- `acc`: the choice with the highest log-likelihood is the right one (lm-evaluation-harness's `acc`);
- `acc_norm`: the same after dividing each log-likelihood by the length of the choice's text in characters
  (lm-evaluation-harness's `acc_norm`; in the `letters` style every choice is one letter, so it equals acc);
- `acc_letter` (`letters` style): the answer letter with the highest next-token log-probability after
  `Answer:`, the token of ` A`, ` B`, ... (qlora.py's MMLU evaluation, which reads the letters' logits at
  the answer position). It is defined only where each ` X` is a single token of the tokenizer (true of
  the Llama, Mistral and Qwen tokenizers); then it equals `acc`, and it costs no forward beyond the
  question's own. A tokenizer that splits a letter (` D` as ` ` + `D`) has no such score: it is left out
  of the report with a note.

Results are kept per question (log-likelihoods, not just right/wrong), so the report can recompute
any metric, and so that a stopped evaluation continues from the questions already scored.
`evaluate_mc` and `evaluate_prepared` are the entry points for a model already in memory (the training loop's
`loratune.eval.during_training`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from loratune.errors import DataError
from loratune.eval.config import MCTaskConfig
from loratune.decoder.model import Decoder
from loratune.eval.decoder_loglik import DecoderScorer
from loratune.eval.loglik import Request, Scorer, truncate
from loratune.eval.mcdata import Benchmark, Question
from loratune.eval.mcprompt import answer_texts, context, continuations, encode_pairs
from loratune.eval.mmlu_subjects import category_of
from loratune.eval.stats import macro_mean_ci, wilson
from loratune.eval.store import ResultStore

METRICS = {"letters": ("acc", "acc_norm", "acc_letter"), "cloze": ("acc", "acc_norm")}


@dataclass(frozen=True)
class Prepared:
    question: Question
    requests: list[Request]
    truncated: bool


def prepare(bench: Benchmark, task: MCTaskConfig, tokenizer, max_length: int) -> list[Prepared]:
    """Prompt and continuations of every question as token ids, cut to `max_length` from the left."""
    out = []
    for q in bench.questions:
        conts = continuations(q, task.style)
        ctx_ids, cont_ids = encode_pairs(tokenizer, context(q, bench.shots.get(q.subject, []), task.style,
                                                            task.description), conts)
        requests, cut = [], False
        for text, ids in zip(conts, cont_ids):
            if not ids:
                raise DataError(f"{q.source}: row {q.row}: the choice {text!r} encodes to no tokens after the prompt")
            req, was_cut = truncate(Request(tuple(ctx_ids), tuple(ids)), max_length)
            requests.append(req)
            cut = cut or was_cut
        out.append(Prepared(q, requests, cut))
    return out


def record(p: Prepared, scores: Sequence, style: str) -> dict:
    """What is kept of one scored question (one line of the cache)."""
    q = p.question
    return {"id": q.id, "subject": q.subject, "answer": q.answer,
            "logprobs": [s.logprob for s in scores], "greedy": [s.greedy for s in scores],
            "first": [s.first for s in scores], "lengths": [len(a) for a in answer_texts(q, style)],
            "single": all(len(r.continuation) == 1 for r in p.requests),
            "tokens": len(p.requests[0].context), "truncated": p.truncated}


def scorer_for(model: torch.nn.Module, batch_size: int) -> Scorer | DecoderScorer:
    """loratune's decoder scores padding-free streams (`decoder_loglik`); a transformers model padded rows."""
    if isinstance(model, Decoder):
        return DecoderScorer(model, batch_size=batch_size)
    return Scorer(model, batch_size=batch_size)


def score_questions(model: torch.nn.Module, prepared: list[Prepared], style: str, *, batch_size: int,
                    store: ResultStore | None = None, advance: Callable[[int], None] | None = None) -> list[dict]:
    """Per-question records, from `store` where cached, else scored (and appended to `store` a block at a time)."""
    todo = [p for p in prepared if store is None or p.question.id not in store]
    scorer = scorer_for(model, batch_size)
    computed: dict[str, dict] = {}
    block = max(1, batch_size * 4)
    for start in range(0, len(todo), block):
        part = todo[start:start + block]
        flat = [r for p in part for r in p.requests]
        scores = iter(scorer.score(flat))
        records = [record(p, [next(scores) for _ in p.requests], style) for p in part]
        if store is not None:
            store.add(records)
        computed.update((r["id"], r) for r in records)
        if advance is not None:
            advance(len(part))
    return [computed.get(p.question.id) or store.get(p.question.id) for p in prepared]  # type: ignore[union-attr]


def question_metrics(rec: dict, style: str) -> dict[str, float]:
    """1.0 or 0.0 per metric (np.argmax: the first of tied choices, as lm-evaluation-harness)."""
    lls = np.asarray(rec["logprobs"], dtype=np.float64)
    out = {"acc": float(np.argmax(lls) == rec["answer"]),
           "acc_norm": float(np.argmax(lls / np.asarray(rec["lengths"], dtype=np.float64)) == rec["answer"])}
    if style == "letters" and rec["single"]:
        out["acc_letter"] = float(np.argmax(rec["first"]) == rec["answer"])
    return out


def metrics_of(records: list[dict], style: str) -> list[str]:
    """The metrics every record has (acc_letter only where every answer letter is one token)."""
    single = all(r["single"] for r in records)
    return [m for m in METRICS[style] if m != "acc_letter" or single]


def summarize(records: list[dict], task: MCTaskConfig, *, resamples: int, confidence: float, seed: int) -> dict:
    """Accuracies overall (every question counts once), averaged over subjects, per category and per subject;
    each with its count and interval."""
    per_q = [question_metrics(r, task.style) for r in records]
    subjects = [r["subject"] for r in records]
    out: dict = {"n": len(records), "truncated": sum(bool(r["truncated"]) for r in records), "metrics": {},
                 "macro": {}, "categories": {}, "subjects": {}, "notes": []}
    categories = [category_of(s, task.categories) for s in subjects]
    metrics = metrics_of(records, task.style)
    if task.style == "letters" and "acc_letter" not in metrics:
        out["notes"].append("acc_letter is not defined: some answer letters (` X` after the prompt) are more than "
                            "one token of this tokenizer")
    for m in metrics:
        values = [x[m] for x in per_q]
        out["metrics"][m] = wilson(sum(values), len(values), confidence).to_json()
        out["macro"][m] = macro_mean_ci(values, subjects, resamples=resamples, confidence=confidence,
                                        seed=seed).to_json()
        for name, labels in (("subjects", subjects), ("categories", categories)):
            for g in dict.fromkeys(labels):
                if g is None:
                    continue
                vals = [v for v, lab in zip(values, labels) if lab == g]
                out[name].setdefault(g, {})[m] = wilson(sum(vals), len(vals), confidence).to_json()
    return out


def accuracies(records: list[dict], style: str) -> dict[str, float]:
    """{metric: mean over the questions, "answer_logprob": mean log-likelihood of the right answers (smoother than
    accuracy: it moves before any argmax does), "n": count} of scored records."""
    per_q = [question_metrics(r, style) for r in records]
    out = {m: float(np.mean([x[m] for x in per_q])) if per_q else float("nan") for m in metrics_of(records, style)}
    out["answer_logprob"] = float(np.mean([r["logprobs"][r["answer"]] for r in records])) if records else float("nan")
    out["n"] = len(per_q)
    return out


def evaluate_prepared(model: torch.nn.Module, prepared: list[Prepared], style: str, *,
                      batch_size: int = 8) -> dict[str, float]:
    """`accuracies` of a model in memory on prepared questions; the model is put in eval mode for the evaluation
    and back in its previous mode after."""
    was_training = model.training
    model.eval()
    try:
        records = score_questions(model, prepared, style, batch_size=batch_size)
    finally:
        model.train(was_training)
    return accuracies(records, style)


def evaluate_mc(model: torch.nn.Module, tokenizer, bench: Benchmark, task: MCTaskConfig, *, batch_size: int = 8,
                max_length: int | None = None) -> dict[str, float]:
    """Accuracies of a model in memory (loratune's decoder or a transformers model) on a loaded benchmark
    (`mcdata.load_benchmark`): {metric: value, "n": count}."""
    limit = max_length or task.max_length or int(getattr(model.config, "max_position_embeddings", 0) or 2048)
    return evaluate_prepared(model, prepare(bench, task, tokenizer, limit), task.style, batch_size=batch_size)
