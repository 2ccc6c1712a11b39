"""A stopped eval continues where it stopped: per-item caches, torn lines, and identical results."""

from __future__ import annotations

from pathlib import Path

import pytest

from loratune.eval.config import MCTaskConfig
from loratune.eval.generate import generate_answers
from loratune.eval.mc import prepare, score_questions
from loratune.eval.mcdata import load_benchmark
from loratune.eval.store import ResultStore
from loratune.eval.textdata import TextItem
from loratune.infer.load import load_engine
from loratune.infer.sampling import SamplingParams


class Killed(Exception):
    pass


def _kill_after(calls: int):
    """An `advance` callback that stops the run (as a kill would) after `calls` batches were stored."""
    seen = []

    def advance(n: int) -> None:
        seen.append(n)
        if len(seen) == calls:
            raise Killed

    return advance, seen


def test_a_torn_last_line_is_dropped_and_appending_continues(tmp_path: Path) -> None:
    path = tmp_path / "c.jsonl"
    ResultStore(path).add([{"id": "a", "v": 1}, {"id": "b", "v": 2}])
    with open(path, "a") as f:
        f.write('{"id": "c", "v"')  # the process died mid-write
    store = ResultStore(path)
    assert sorted(store.results) == ["a", "b"] and "c" not in store
    store.add([{"id": "c", "v": 3}])
    assert ResultStore(path).get("c") == {"id": "c", "v": 3}
    assert path.read_text().count("\n") == 3


def test_multiple_choice_continues_after_a_kill(tiny_llama: Path, mmlu_dir: Path, tmp_path: Path) -> None:
    engine = load_engine([str(tiny_llama)])
    task = MCTaskConfig(name="m", path=str(mmlu_dir), shots=1)
    prepared = prepare(load_benchmark(task), task, engine.format().tokenizer, 2048)
    full = score_questions(engine.model, prepared, "letters", batch_size=1)  # no cache

    store_path = tmp_path / "m.jsonl"
    advance, seen = _kill_after(1)
    with pytest.raises(Killed):
        score_questions(engine.model, prepared, "letters", batch_size=1, store=ResultStore(store_path), advance=advance)
    assert len(ResultStore(store_path)) == 4  # one block of 4 x batch_size questions was written before the kill
    advance, seen = _kill_after(-1)
    resumed = score_questions(engine.model, prepared, "letters", batch_size=1, store=ResultStore(store_path),
                              advance=advance)
    assert sum(seen) == len(prepared) - 4  # only the rest was scored
    assert [r["id"] for r in resumed] == [r["id"] for r in full]
    for a, b in zip(resumed, full):
        assert a["logprobs"] == pytest.approx(b["logprobs"], abs=1e-6)


def test_sampled_generation_continues_to_the_same_answers(tiny_llama: Path, tmp_path: Path) -> None:
    engine = load_engine([str(tiny_llama)])
    items = [TextItem(str(i), ({"role": "user", "content": f"Tell me about item {i}."},), "x", "f", i + 1)
             for i in range(5)]
    params = SamplingParams(max_new_tokens=6, temperature=1.0, seed=7)
    full = generate_answers(engine, "base", items, chat=True, params=params, batch_size=2,
                            store=ResultStore(tmp_path / "full.jsonl"))
    advance, _ = _kill_after(1)
    with pytest.raises(Killed):
        generate_answers(engine, "base", items, chat=True, params=params, batch_size=2,
                         store=ResultStore(tmp_path / "cut.jsonl"), advance=advance)
    assert len(ResultStore(tmp_path / "cut.jsonl")) == 2
    resumed = generate_answers(engine, "base", items, chat=True, params=params, batch_size=2,
                               store=ResultStore(tmp_path / "cut.jsonl"))
    assert {k: v["answer"] for k, v in resumed.items()} == {k: v["answer"] for k, v in full.items()}
    assert len({v["answer"] for v in full.values()}) > 1  # sampled, and not all alike
