"""Benchmark readers: MMLU's release layout, records with column mapping, few-shot splits, and clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from loratune.errors import DataError
from loratune.eval.config import MCColumnsConfig, MCTaskConfig
from loratune.eval.mcdata import load_benchmark


def _task(path, **kw) -> MCTaskConfig:
    return MCTaskConfig(name="t", path=str(path), **kw)


def test_mmlu_layout(mmlu_dir: Path) -> None:
    b = load_benchmark(_task(mmlu_dir, shots=2))
    assert len(b.questions) == 9
    q = b.questions[0]
    assert (q.id, q.subject, q.answer) == ("college_mathematics/0", "college_mathematics", 1)
    assert q.choices == ("54", "56", "58", "64") and q.question == "What is 7 times 8?"
    assert q.source.endswith("test/college_mathematics_test.csv") and q.row == 1
    assert [s.question for s in b.shots["high_school_geography"]] == [
        "Which country has the largest population?", "What is the capital of France?"]
    assert len(b.files) == 4  # two test files, two dev files: their bytes key the cache


def test_one_csv_finds_its_dev_file_in_the_release_layout(mmlu_dir: Path) -> None:
    b = load_benchmark(_task(mmlu_dir / "test" / "college_mathematics_test.csv", shots=1))
    assert {q.subject for q in b.questions} == {"college_mathematics"}
    assert b.shots["college_mathematics"][0].question == "What is 2 plus 2?"


def test_records_give_the_same_questions(mmlu_dir: Path, mmlu_jsonl: dict) -> None:
    csv_questions = load_benchmark(_task(mmlu_dir)).questions
    jsonl = [load_benchmark(_task(files["test"], shots=1, dev_path=str(files["dev"]))) for files in mmlu_jsonl.values()]
    from_records = [q for b in jsonl for q in b.questions]
    key = lambda q: (q.subject, q.question, q.choices, q.answer)  # noqa: E731
    assert sorted(map(key, from_records)) == sorted(map(key, csv_questions))
    assert jsonl[0].shots[jsonl[0].questions[0].subject][0].question  # shots come from dev_path


def test_column_mapping_letters_and_separate_choice_columns(tmp_path: Path) -> None:
    f = tmp_path / "bench.jsonl"
    rows = [{"q": "2+2?", "A": "3", "B": "4", "C": "5", "gold": "b", "uid": "x1", "topic": "math"},
            {"q": "Sky?", "A": "blue", "B": "red", "C": "green", "gold": 0, "uid": "x2", "topic": "nature"}]
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cols = MCColumnsConfig(question="q", choices=["A", "B", "C"], answer="gold", subject="topic", id="uid")
    b = load_benchmark(_task(f, columns=cols))
    assert [(q.id, q.subject, q.answer, len(q.choices)) for q in b.questions] == [("x1", "math", 1, 3),
                                                                                  ("x2", "nature", 0, 3)]


def test_subjects_and_limit(mmlu_dir: Path) -> None:
    b = load_benchmark(_task(mmlu_dir, subjects=["high_school_geography"], limit=2))
    assert [q.id for q in b.questions] == ["high_school_geography/0", "high_school_geography/1"]
    with pytest.raises(DataError, match="no questions of subject.*astronomy.*the benchmark has: college_mathematics"):
        load_benchmark(_task(mmlu_dir, subjects=["astronomy"]))


@pytest.mark.parametrize("line, message", [
    ('"Q?",a,b,c,d,E\n', "row 2: column 6 (the answer): got 'E', expected a letter A-D or a 0-based index 0-3 (4 choices)"),
    ('"Q?",A\n', "row 2: 2 columns; expected a question, at least two choices and the answer letter "
                     "(MMLU's headerless layout)"),
    ('"Q?",a,,c,d,A\n', "row 2: choice B is empty; expected text"),
    ('"  ",a,b,c,d,A\n', "row 2: empty question; expected text"),
])
def test_malformed_mmlu_rows_name_file_and_row(tmp_path: Path, line: str, message: str) -> None:
    f = tmp_path / "x_test.csv"
    f.write_text('"Fine?",a,b,c,d,B\n' + line, encoding="utf-8")
    with pytest.raises(DataError) as e:
        load_benchmark(_task(f))
    assert str(e.value) == f"{f}: {message}"


def test_malformed_records_name_the_key(tmp_path: Path) -> None:
    f = tmp_path / "b.jsonl"
    f.write_text(json.dumps({"question": "Q", "choices": ["a", "b"], "answer": 1}) + "\n"
                 + json.dumps({"question": "Q", "options": ["a", "b"], "answer": 1}) + "\n")
    with pytest.raises(DataError) as e:
        load_benchmark(_task(f))
    assert str(e.value) == (f"{f}: row 2: missing key 'choices' (the list of choices); the record has keys: "
                            "question, options, answer")
    f.write_text(json.dumps({"question": "Q", "choices": "a b", "answer": 1}) + "\n")
    with pytest.raises(DataError, match="row 1: key 'choices': expected a list of choices, got str"):
        load_benchmark(_task(f))
    f.write_text(json.dumps({"question": "Q", "choices": ["a", "b"], "answer": 2}) + "\n")
    with pytest.raises(DataError, match="row 1: key 'answer': got 2, expected a letter A-B or a 0-based index 0-1"):
        load_benchmark(_task(f))


def test_shots_need_enough_dev_examples(mmlu_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(DataError, match="5-shot needs 5 dev examples per subject; too few for: college_mathematics \\(3\\)"):
        load_benchmark(_task(mmlu_dir, shots=5))
    lone = tmp_path / "lone_test.csv"
    lone.write_text('"Q?",a,b,c,d,A\n')
    with pytest.raises(DataError, match="no 'dev' split was found next to it"):
        load_benchmark(_task(lone, shots=1))


def test_missing_paths_and_offline_hub(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no such file or folder"):
        load_benchmark(_task(tmp_path / "nope.csv"))
    with pytest.raises(DataError, match="the hub is offline"):  # conftest sets HF_HUB_OFFLINE
        load_benchmark(_task("cais/mmlu", hub_config="all"))


def test_parquet_and_csv_with_a_header(tmp_path: Path) -> None:
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"question": ["2+2?", "Sky?"], "choices": [["3", "4"], ["blue", "red", "green"]],
                             "answer": [1, 0], "subject": ["math", "nature"]}), tmp_path / "b.parquet")
    b = load_benchmark(_task(tmp_path / "b.parquet"))
    assert [(q.subject, q.choices, q.answer, q.row) for q in b.questions] == [
        ("math", ("3", "4"), 1, 1), ("nature", ("blue", "red", "green"), 0, 2)]
    csv_file = tmp_path / "h.csv"  # a header naming the question column: records, choices one column each
    csv_file.write_text("question,A,B,answer\n2+2?,4,5,A\n")
    b = load_benchmark(_task(csv_file, columns=MCColumnsConfig(choices=["A", "B"])))
    assert [(q.question, q.choices, q.answer, q.row, q.subject) for q in b.questions] == [("2+2?", ("4", "5"), 0, 2, "h")]


def test_hub_benchmark_with_a_dataset_config(monkeypatch) -> None:
    """A hub benchmark goes to `datasets.load_dataset(name, config, split=...)` (readers.iter_hub): questions from
    the test split, shots from the dev split, errors naming the subset."""
    datasets = pytest.importorskip("datasets")
    calls = []
    rows = {"test": [{"question": "2+2?", "choices": ["3", "4"], "answer": 1, "subject": "math"},
                     {"question": "3+3?", "choices": ["6", "5"], "answer": 0, "subject": "math"}],
            "dev": [{"question": "1+1?", "choices": ["2", "3"], "answer": 0, "subject": "math"}]}

    def fake_load(name: str, config: str, split: str, streaming: bool):
        calls.append((name, config, split, streaming))
        return rows[split]

    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    b = load_benchmark(_task("cais/mmlu", hub_config="all", shots=1))
    assert [(q.question, q.answer) for q in b.questions] == [("2+2?", 1), ("3+3?", 0)]
    assert [s.question for s in b.shots["math"]] == ["1+1?"]
    assert calls == [("cais/mmlu", "all", "test", False), ("cais/mmlu", "all", "dev", False)]
    rows["test"][1]["answer"] = 7
    with pytest.raises(DataError, match=r"cais/mmlu:all\[test\]: row 2"):
        load_benchmark(_task("cais/mmlu", hub_config="all"))
