"""Generate-and-score: batched answers equal `loratune chat`'s, prompts as plain text, and the comparison."""

from __future__ import annotations

from pathlib import Path

import pytest

from loratune.errors import DataError
from loratune.eval.generate import generate_answers, summarize
from loratune.eval.store import ResultStore
from loratune.eval.textdata import TextItem
from loratune.infer.engine import Delta
from loratune.infer.load import load_engine
from loratune.infer.sampling import SamplingParams

PROMPTS = ["What is the capital of France?", "Name three colours.", "Hi", "Explain QLoRA in one long sentence please."]


def _items(prompts: list[str], references: list[str] | None = None) -> list[TextItem]:
    refs = references or ["x"] * len(prompts)
    return [TextItem(str(i), ({"role": "user", "content": p},), r, "t.jsonl", i + 1)
            for i, (p, r) in enumerate(zip(prompts, refs))]


def test_batched_greedy_answers_equal_chat(tiny_llama: Path, tmp_path: Path) -> None:
    engine = load_engine([str(tiny_llama)])
    params = SamplingParams(max_new_tokens=10)
    got = generate_answers(engine, "base", _items(PROMPTS), chat=True, params=params, batch_size=3,
                           store=ResultStore(tmp_path / "g.jsonl"))
    for i, p in enumerate(PROMPTS):
        alone = "".join(ev.text for ev in engine.chat([{"role": "user", "content": p}], params) if isinstance(ev, Delta))
        assert got[str(i)]["answer"] == alone
        assert got[str(i)]["prompt_tokens"] == len(engine.format().render([{"role": "user", "content": p}]))
    plain = generate_answers(engine, "base", _items(PROMPTS[:1]), chat=False, params=params, batch_size=1,
                             store=ResultStore(tmp_path / "p.jsonl"))
    assert plain["0"]["prompt_tokens"] == len(engine.format().encode(PROMPTS[0]))


def test_a_prompt_longer_than_the_context_is_named(tiny_llama: Path, tmp_path: Path) -> None:
    engine = load_engine([str(tiny_llama)])
    lengths = [len(engine.format().render([{"role": "user", "content": p}])) for p in PROMPTS]
    assert lengths[3] == max(lengths) > sorted(lengths)[-2]
    engine.context_length = lengths[3]  # only the last prompt leaves no room
    with pytest.raises(DataError, match=rf"t.jsonl: row 4: the prompt has {lengths[3]} tokens; the model's context is "
                                        rf"{lengths[3]}, leaving no room for an answer"):
        generate_answers(engine, "base", _items(PROMPTS), chat=True, params=SamplingParams(max_new_tokens=4),
                         batch_size=2, store=ResultStore(tmp_path / "g.jsonl"))


def test_summary_differences_and_examples_by_hand() -> None:
    pytest.importorskip("rouge_score")
    pytest.importorskip("sacrebleu")
    refs = ["the cat sat on the mat", "paris", "blue sky", "a b c d"]
    items = _items(["p0", "p1", "p2", "p3"], refs)
    base = ["the cat sat on the mat", "london", "blue sky", "x y z w"]
    tuned = ["the dog sat", "paris", "blue sky", "a b c d"]
    answers = {m: {str(i): {"answer": a, "finish": "stop"} for i, a in enumerate(ans)}
               for m, ans in (("base", base), ("tuned", tuned))}
    s = summarize(items, answers, ["rouge", "exact_match"], stemmer=False, examples=1, resamples=200,
                  confidence=0.95, seed=0)
    em = s["models"]
    assert em["base"]["metrics"]["exact_match"]["value"] == 50.0 and em["tuned"]["metrics"]["exact_match"]["value"] == 75.0
    assert s["differences"]["tuned"]["exact_match"]["value"] == pytest.approx(25.0)
    # rougeL: item 0 falls (100 -> 2*(2/3*2/6)/(2/3+2/6) = 44.4), items 1 and 3 rise from 0 to 100
    assert s["examples"]["tuned"]["losses"][0]["id"] == "0"
    assert s["examples"]["tuned"]["losses"][0]["delta"] == pytest.approx(100 * (4 / 9) - 100)
    assert s["examples"]["tuned"]["gains"][0]["id"] in ("1", "3") and len(s["examples"]["tuned"]["gains"]) == 1
    assert s["differences"]["tuned"]["rougeL"]["value"] == pytest.approx((100 + 100 + 100 * 4 / 9 - 100) / 4)
