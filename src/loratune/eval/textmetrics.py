"""Scores of generated text against references: ROUGE, BLEU, exact match and contains.

ROUGE comes from Google's `rouge-score` (ROUGE-1, -2, -L and -Lsum F1; Lsum splits sentences at newlines,
as the library does), BLEU from `sacrebleu` (13a tokenisation, exponential smoothing: its defaults).
Every score is reported on a 0-100 scale (exact match and contains as percentages).

Corpus BLEU is not a mean of sentence scores: it is computed from n-gram counts summed over the corpus.
So each example keeps its own sufficient statistics (matches and totals per n-gram order, hypothesis
and reference lengths, as sacrebleu computes them for that one pair), the corpus score is sacrebleu's
`compute_bleu` of their sums (equal to `corpus_bleu` of the whole corpus), and a bootstrap resample sums
the resampled examples' statistics. The sentence BLEU of each example is kept too, to rank examples.

Exact match and contains compare after SQuAD's normalisation: lowercase, punctuation and the articles
a/an/the removed, whitespace collapsed.
"""

from __future__ import annotations

import re
import string
from collections.abc import Sequence

import numpy as np

from loratune.errors import LoratuneError
from loratune.eval.stats import Estimate, bootstrap, mean_ci, wilson

ROUGE_TYPES = ("rouge1", "rouge2", "rougeL", "rougeLsum")
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = str.maketrans("", "", string.punctuation)


def _need(module: str, package: str):
    try:
        return __import__(module, fromlist=["_"])
    except ImportError:
        raise LoratuneError(f"scoring needs the `{package}` package: pip install 'loratune[eval]'") from None


def normalize(text: str) -> str:
    """SQuAD's answer normalisation."""
    text = _ARTICLES.sub(" ", text.lower().translate(_PUNCT))
    return " ".join(text.split())


def exact_match(prediction: str, reference: str) -> float:
    return float(normalize(prediction) == normalize(reference))


def contains(prediction: str, reference: str) -> float:
    ref = normalize(reference)
    return float(bool(ref) and f" {ref} " in f" {normalize(prediction)} ")


def rouge(predictions: Sequence[str], references: Sequence[str], stemmer: bool = True) -> dict[str, list[float]]:
    """Per-example ROUGE F1 x 100, by rouge-score."""
    rouge_scorer = _need("rouge_score.rouge_scorer", "rouge-score")
    scorer = rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=stemmer)
    out: dict[str, list[float]] = {t: [] for t in ROUGE_TYPES}
    for pred, ref in zip(predictions, references):
        scores = scorer.score(ref, pred)  # (target, prediction)
        for t in ROUGE_TYPES:
            out[t].append(100.0 * scores[t].fmeasure)
    return out


def bleu_stats(predictions: Sequence[str], references: Sequence[str]) -> list[list[int]]:
    """Per-example sufficient statistics [sys_len, ref_len, matches 1-4, totals 1-4], by sacrebleu."""
    bleu = _need("sacrebleu.metrics.bleu", "sacrebleu").BLEU()
    out = []
    for pred, ref in zip(predictions, references):
        s = bleu.corpus_score([pred], [[ref]])
        out.append([s.sys_len, s.ref_len, *s.counts, *s.totals])
    return out


def corpus_bleu_from_stats(stats: np.ndarray) -> float:
    """sacrebleu's corpus BLEU (its default exponential smoothing) of summed per-example statistics."""
    BLEU = _need("sacrebleu.metrics.bleu", "sacrebleu").BLEU
    total = np.asarray(stats, dtype=np.int64).sum(axis=0)
    order = (len(total) - 2) // 2
    return float(BLEU.compute_bleu(total[2:2 + order].tolist(), total[2 + order:].tolist(), int(total[0]), int(total[1]),
                                   smooth_method="exp", max_ngram_order=order).score)


def sentence_bleu(predictions: Sequence[str], references: Sequence[str]) -> list[float]:
    bleu = _need("sacrebleu.metrics.bleu", "sacrebleu").BLEU(effective_order=True)
    return [float(bleu.sentence_score(p, [r]).score) for p, r in zip(predictions, references)]


def per_example(predictions: Sequence[str], references: Sequence[str], metrics: Sequence[str],
                stemmer: bool = True) -> dict[str, list]:
    """Every requested per-example score: rouge1..rougeLsum, bleu (sentence) and bleu_stats, exact_match, contains."""
    out: dict[str, list] = {}
    if "rouge" in metrics:
        out.update(rouge(predictions, references, stemmer))
    if "bleu" in metrics:
        out["bleu"] = sentence_bleu(predictions, references)
        out["bleu_stats"] = bleu_stats(predictions, references)
    if "exact_match" in metrics:
        out["exact_match"] = [exact_match(p, r) for p, r in zip(predictions, references)]
    if "contains" in metrics:
        out["contains"] = [contains(p, r) for p, r in zip(predictions, references)]
    return out


def aggregate(scores: dict[str, list], *, resamples: int, confidence: float, seed: int) -> dict[str, Estimate]:
    """Corpus-level numbers with intervals: ROUGE means, corpus BLEU, exact-match and contains rates."""
    out: dict[str, Estimate] = {}
    for t in ROUGE_TYPES:
        if t in scores:
            out[t] = mean_ci(scores[t], resamples=resamples, confidence=confidence, seed=seed)
    if "bleu_stats" in scores:
        stats = np.asarray(scores["bleu_stats"], dtype=np.int64)
        low, high = bootstrap(lambda idx: corpus_bleu_from_stats(stats[idx]), len(stats), resamples=resamples,
                              confidence=confidence, seed=seed)
        out["bleu"] = Estimate(corpus_bleu_from_stats(stats), len(stats), low, high,
                               "bootstrap" if low is not None else "none")
    for m in ("exact_match", "contains"):  # rates, shown in percent like the rest
        if m in scores:
            w = wilson(sum(scores[m]), len(scores[m]), confidence)
            out[m] = Estimate(100 * w.value, w.n, None if w.low is None else 100 * w.low,
                              None if w.high is None else 100 * w.high, w.method)
    return out
