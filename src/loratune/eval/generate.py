"""Generate-and-score: answers from the one inference engine, scored against references, models side by side.

Prompts are rendered as `loratune chat` renders them (the model's own chat template, or the run
folder's, with its end of turn as a stop) and generated in batches of similar length through
`Engine.generate`. Answers are cached per item as each batch finishes, so a stopped eval continues.
Sampling is seeded per batch from the task's seed and the batch's items, so a continued run draws what
an uninterrupted one would have.

`summarize` scores every model's answers (`textmetrics`), and for each model after the first, the
paired difference to the first (bootstrap over the same items) and the examples that gained and lost most.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from loratune.data.render import RenderError
from loratune.errors import DataError
from loratune.eval import textmetrics
from loratune.eval.stats import Estimate, bootstrap, paired_difference
from loratune.eval.store import ResultStore, fingerprint
from loratune.eval.textdata import TextItem
from loratune.infer.engine import Delta, Finish
from loratune.infer.load import Engine, PromptFormat
from loratune.infer.sampling import SamplingParams


def prompt_ids(fmt: PromptFormat, item: TextItem, chat: bool) -> list[int]:
    """The prompt's token ids: rendered with the chat template, or the last user message as plain text."""
    if not chat:
        return fmt.encode(item.last_user)
    try:
        return fmt.render(list(item.messages))
    except RenderError as e:
        raise DataError(f"{item.source}: row {item.row}: the chat template rejects this prompt: {e}") from None


def generate_answers(engine: Engine, name: str, items: Sequence[TextItem], *, chat: bool, params: SamplingParams,
                     batch_size: int, store: ResultStore, advance: Callable[[int], None] | None = None) -> dict[str, dict]:
    """{item id: {"answer", "finish", "prompt_tokens", "completion_tokens"}} of model `name`, cached in `store`."""
    fmt = engine.format(name)
    params = params.with_updates(stop=tuple(dict.fromkeys(params.stop + fmt.stop_strings)))
    todo = [it for it in items if it.id not in store]
    prompts = {it.id: prompt_ids(fmt, it, chat) for it in todo}
    for it in todo:
        if len(prompts[it.id]) >= engine.context_length:
            raise DataError(f"{it.source}: row {it.row}: the prompt has {len(prompts[it.id])} tokens; the model's "
                            f"context is {engine.context_length}, leaving no room for an answer")
    position = {it.id: i for i, it in enumerate(items)}
    todo.sort(key=lambda it: (-len(prompts[it.id]), position[it.id]))  # similar lengths batch together
    for start in range(0, len(todo), batch_size):
        chunk = todo[start:start + batch_size]
        seed = int(fingerprint(params.seed, [it.id for it in chunk]), 16) % (2**63) if not params.greedy else params.seed
        texts, finish = [""] * len(chunk), [None] * len(chunk)
        for ev in engine.generate([prompts[it.id] for it in chunk], params.with_updates(seed=seed), name):
            if isinstance(ev, Delta):
                texts[ev.row] += ev.text
            elif isinstance(ev, Finish):
                finish[ev.row] = ev
        store.add([{"id": it.id, "answer": texts[i], "finish": finish[i].reason if finish[i] else "length",
                    "prompt_tokens": len(prompts[it.id]),
                    "completion_tokens": finish[i].completion_tokens if finish[i] else 0}
                   for i, it in enumerate(chunk)])
        if advance is not None:
            advance(len(chunk))
    return {it.id: store.get(it.id) for it in items}  # type: ignore[misc]


def _paired_bleu(a: np.ndarray, b: np.ndarray, *, resamples: int, confidence: float, seed: int) -> Estimate:
    value = textmetrics.corpus_bleu_from_stats(b) - textmetrics.corpus_bleu_from_stats(a)
    low, high = bootstrap(lambda idx: textmetrics.corpus_bleu_from_stats(b[idx]) - textmetrics.corpus_bleu_from_stats(a[idx]),
                          len(a), resamples=resamples, confidence=confidence, seed=seed)
    return Estimate(value, len(a), low, high, "bootstrap" if low is not None else "none")


def _rank_metric(scores: dict[str, list]) -> str:
    return next(m for m in ("rougeL", "bleu", "exact_match", "contains", "rouge1") if m in scores)


def summarize(items: Sequence[TextItem], answers: dict[str, dict[str, dict]], metrics: Sequence[str], *,
              stemmer: bool, examples: int, resamples: int, confidence: float, seed: int) -> dict:
    """Scores per model, differences to the first model, and the examples that changed most."""
    models = list(answers)
    refs = [it.reference or "" for it in items]
    per_model = {m: textmetrics.per_example([answers[m][it.id]["answer"] for it in items], refs, metrics, stemmer)
                 for m in models}
    out: dict = {"n": len(items), "models": {}, "differences": {}, "examples": {}}
    for m in models:
        agg = textmetrics.aggregate(per_model[m], resamples=resamples, confidence=confidence, seed=seed)
        finished = [answers[m][it.id]["finish"] for it in items]
        out["models"][m] = {"metrics": {k: e.to_json() for k, e in agg.items()},
                            "cut_at_max_tokens": sum(f == "length" for f in finished)}
    first = models[0]
    for m in models[1:]:
        diffs = {}
        for k in per_model[m]:
            if k == "bleu_stats":
                diffs["bleu"] = _paired_bleu(np.asarray(per_model[first][k]), np.asarray(per_model[m][k]),
                                             resamples=resamples, confidence=confidence, seed=seed).to_json()
            elif k != "bleu":
                scale = 100.0 if k in ("exact_match", "contains") else 1.0
                est = paired_difference([scale * v for v in per_model[first][k]], [scale * v for v in per_model[m][k]],
                                        resamples=resamples, confidence=confidence, seed=seed)
                diffs[k] = est.to_json()
        out["differences"][m] = diffs
        out["examples"][m] = _examples(items, answers, per_model, first, m, examples)
    return out


def _examples(items: Sequence[TextItem], answers: dict[str, dict[str, dict]], per_model: dict[str, dict[str, list]],
              first: str, other: str, k: int) -> dict[str, list[dict]]:
    """The k items where `other` gained most over `first`, and the k where it lost most, by the ranking metric."""
    metric = _rank_metric(per_model[other])
    delta = np.asarray(per_model[other][metric], dtype=np.float64) - np.asarray(per_model[first][metric], dtype=np.float64)
    order = np.argsort(-delta, kind="stable")

    def row(i: int) -> dict:
        it = items[i]
        return {"id": it.id, "source": it.source, "row": it.row, "prompt": it.last_user, "reference": it.reference,
                "metric": metric, "delta": float(delta[i]),
                "answers": {first: answers[first][it.id]["answer"], other: answers[other][it.id]["answer"]},
                "scores": {first: per_model[first][metric][i], other: per_model[other][metric][i]}}

    gains = [row(int(i)) for i in order[:k] if delta[i] > 0]
    losses = [row(int(i)) for i in order[::-1][:k] if delta[i] < 0]
    return {"gains": gains, "losses": losses}
