"""ROUGE and BLEU against rouge-score's and sacrebleu's own values, and the exact-match normalisation."""

from __future__ import annotations

import numpy as np
import pytest

rouge_scorer = pytest.importorskip("rouge_score.rouge_scorer")
sacrebleu = pytest.importorskip("sacrebleu")

from loratune.eval import textmetrics  # noqa: E402

PREDICTIONS = ["the cat lay on the mat", "a quick brown fox jumps over the lazy dog",
               "Paris is the capital of France.\nIt is large.", "completely unrelated words here", ""]
REFERENCES = ["the cat sat on the mat", "the quick brown fox jumped over the lazy dog",
              "The capital of France is Paris.\nIt is big.", "the cat sat on the mat", "an empty answer"]


def test_rouge_by_hand() -> None:
    # 5 of the 6 unigrams match both ways: P = R = F1 = 5/6
    scores = textmetrics.rouge(["the cat lay on the mat"], ["the cat sat on the mat"], stemmer=False)
    assert scores["rouge1"] == [pytest.approx(100 * 5 / 6)]
    # bigrams: the cat, on the, the mat match of 5 each: 3/5
    assert scores["rouge2"] == [pytest.approx(100 * 3 / 5)]


@pytest.mark.parametrize("stemmer", [True, False])
def test_rouge_equals_rouge_score(stemmer: bool) -> None:
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL", "rougeLsum"], use_stemmer=stemmer)
    ours = textmetrics.rouge(PREDICTIONS, REFERENCES, stemmer)
    for i, (p, r) in enumerate(zip(PREDICTIONS, REFERENCES)):
        ref = scorer.score(r, p)
        for t in textmetrics.ROUGE_TYPES:
            assert ours[t][i] == pytest.approx(100 * ref[t].fmeasure, abs=1e-12)
    # rougeLsum splits at newlines: it differs from rougeL on the two-sentence example
    assert ours["rougeLsum"][2] != ours["rougeL"][2]


def test_corpus_bleu_from_per_example_stats_equals_sacrebleu() -> None:
    stats = textmetrics.bleu_stats(PREDICTIONS, REFERENCES)
    expected = sacrebleu.corpus_bleu(PREDICTIONS, [REFERENCES]).score
    assert expected > 0
    assert textmetrics.corpus_bleu_from_stats(np.asarray(stats)) == pytest.approx(expected, abs=1e-9)
    subset = [0, 2]
    assert textmetrics.corpus_bleu_from_stats(np.asarray(stats)[subset]) == pytest.approx(
        sacrebleu.corpus_bleu([PREDICTIONS[i] for i in subset], [[REFERENCES[i] for i in subset]]).score, abs=1e-9)


def test_sentence_bleu_equals_sacrebleu() -> None:
    ours = textmetrics.sentence_bleu(PREDICTIONS, REFERENCES)
    assert ours == pytest.approx([sacrebleu.sentence_bleu(p, [r]).score for p, r in zip(PREDICTIONS, REFERENCES)])


def test_exact_match_and_contains_normalise_like_squad() -> None:
    assert textmetrics.normalize("  The Nile, of course! ") == "nile of course"
    assert textmetrics.exact_match("The Nile.", "nile") == 1.0
    assert textmetrics.exact_match("the Nile river", "Nile") == 0.0
    assert textmetrics.contains("It is the Nile river.", "nile") == 1.0
    assert textmetrics.contains("Nilegate", "nile") == 0.0  # whole words only
    assert textmetrics.contains("anything", "the") == 0.0  # a reference that normalises to nothing never matches


def test_aggregate_reports_counts_intervals_and_percent_rates() -> None:
    scores = textmetrics.per_example(PREDICTIONS, REFERENCES, ["rouge", "bleu", "exact_match", "contains"])
    agg = textmetrics.aggregate(scores, resamples=200, confidence=0.95, seed=0)
    assert set(agg) == {"rouge1", "rouge2", "rougeL", "rougeLsum", "bleu", "exact_match", "contains"}
    assert agg["rouge1"].value == pytest.approx(np.mean(scores["rouge1"]))
    assert agg["bleu"].value == pytest.approx(sacrebleu.corpus_bleu(PREDICTIONS, [REFERENCES]).score)
    for e in agg.values():
        assert e.n == len(PREDICTIONS)
        assert e.low <= e.value <= e.high
    assert agg["exact_match"].value == 0.0 and agg["exact_match"].high == pytest.approx(43.448, abs=1e-3)  # % of 0/5
