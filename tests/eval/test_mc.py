"""Multiple-choice metrics: acc, acc_norm and the answer-letter score, the summary, and the training-loop hook."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from loratune.eval.config import MCTaskConfig
from loratune.eval.mc import evaluate_mc, prepare, question_metrics, score_questions, summarize
from loratune.eval.mcdata import load_benchmark


def test_metrics_by_hand() -> None:
    rec = {"answer": 1, "logprobs": [-2.0, -3.0, -9.0], "first": [-2.5, -1.0, -9.0], "lengths": [1, 4, 9], "single": True}
    # acc: argmax -2.0 is choice 0 (wrong); acc_norm: -2/1, -3/4, -9/9 -> choice 1 (right); letter: choice 1 (right)
    assert question_metrics(rec, "letters") == {"acc": 0.0, "acc_norm": 1.0, "acc_letter": 1.0}
    assert question_metrics({**rec, "single": False}, "letters") == {"acc": 0.0, "acc_norm": 1.0}
    assert question_metrics(rec, "cloze") == {"acc": 0.0, "acc_norm": 1.0}
    tie = {**rec, "logprobs": [-1.0, -1.0, -5.0]}
    assert question_metrics(tie, "cloze")["acc"] == 0.0  # ties go to the first choice, as np.argmax


@pytest.fixture(scope="module")
def three_choices(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Questions with choices A-C only: ` A`, ` B`, ` C` are single tokens of the tiny tokenizer."""
    root = tmp_path_factory.mktemp("abc")
    for split, rows in (("test", [("Pick one?", "x", "y", "z", "B"), ("Colour of snow?", "white", "black", "red", "A"),
                                  ("2+2?", "3", "5", "4", "C"), ("Odd one?", "dog", "cat", "car", "C")]),
                        ("dev", [("Is ice cold?", "yes", "no", "maybe", "A")])):
        (root / split).mkdir()
        (root / split / f"misc_{split}.csv").write_text("".join(",".join(f'"{c}"' for c in r) + "\n" for r in rows))
    return root


def test_answer_letters_score_like_acc_when_single_tokens(tiny_llama: Path, three_choices: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(tiny_llama)
    task = MCTaskConfig(name="abc", path=str(three_choices), shots=1, categories={"misc": "other"})
    records = score_questions(model, prepare(load_benchmark(task), task, tok, 2048), "letters", batch_size=2)
    assert all(r["single"] for r in records)
    for r in records:
        assert r["first"] == pytest.approx(r["logprobs"])  # one token: its log-prob is the whole continuation's
        m = question_metrics(r, "letters")
        assert m["acc_letter"] == m["acc"]
    s = summarize(records, task, resamples=100, confidence=0.95, seed=0)
    assert set(s["metrics"]) == {"acc", "acc_norm", "acc_letter"} and s["notes"] == []
    assert s["categories"]["other"]["acc"] == s["metrics"]["acc"] and s["subjects"]["misc"]["acc"]["n"] == 4


def test_evaluate_mc_for_the_training_loop(tiny_llama: Path, mmlu_dir: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(tiny_llama)
    task = MCTaskConfig(name="mmlu", path=str(mmlu_dir), shots=2)
    bench = load_benchmark(task)
    model.train()
    got = evaluate_mc(model, tok, bench, task, batch_size=4)
    assert model.training  # put back as it was
    records = score_questions(model.eval(), prepare(bench, task, tok, 2048), "letters", batch_size=1)
    per_q = [question_metrics(r, "letters") for r in records]
    assert got == {"acc": pytest.approx(sum(x["acc"] for x in per_q) / 9),
                   "acc_norm": pytest.approx(sum(x["acc_norm"] for x in per_q) / 9),
                   "answer_logprob": pytest.approx(sum(r["logprobs"][r["answer"]] for r in records) / 9, abs=1e-6),
                   "n": 9}
