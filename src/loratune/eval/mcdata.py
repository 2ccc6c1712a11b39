"""Read multiple-choice benchmarks in MMLU's form: a question, its choices, the index of the right one.

Two layouts are read:
- the original MMLU release: folders `test/`, `dev/` (and `val/`) of headerless CSV files named
  `SUBJECT_SPLIT.csv`, each row `question, choice 1, ..., choice n, answer letter`;
- records (JSON, JSONL, parquet, CSV with a header, or a hub dataset such as `cais/mmlu`) whose keys
  `columns` names: the question, the choices (a list, or one key per choice), the answer (a 0-based index
  or a letter) and optionally the subject and an id.

Every malformed row raises `DataError` naming the file, the row and what was expected, before anything
is scored. A question's id (its subject and position, or the `id` column) keys the resumable cache.
"""

from __future__ import annotations

import csv
import json
import re
import string
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loratune.data.readers import SUFFIXES, Record, iter_file, iter_hub, looks_local
from loratune.errors import DataError
from loratune.eval.config import MCColumnsConfig, MCTaskConfig

LETTERS = string.ascii_uppercase


@dataclass(frozen=True)
class Question:
    """One multiple-choice question and where it came from."""

    id: str
    subject: str
    question: str
    choices: tuple[str, ...]
    answer: int
    source: str
    row: int


@dataclass
class Benchmark:
    """The questions to score, and the few-shot examples of each subject (in file order)."""

    questions: list[Question]
    shots: dict[str, list[Question]]
    files: list[Path]  # local files read (their bytes key the cache)


# --------------------------------------------------------------------------------------------- sources


def _split_files(folder: Path, split: str) -> list[Path]:
    """The files of `split` in a folder: `folder/split/*`, else `folder/*_split.*`, else every data file."""
    if (folder / split).is_dir():
        folder = folder / split
        return sorted(f for f in folder.iterdir() if f.is_file() and f.suffix.lower() in SUFFIXES)
    files = sorted(f for f in folder.iterdir() if f.is_file() and f.suffix.lower() in SUFFIXES)
    named = [f for f in files if f.stem.endswith(f"_{split}")]
    return named or files


def _sibling_split(path: Path, split: str, dev_split: str) -> list[Path]:
    """Few-shot files next to the evaluated ones, in the MMLU layout (`data/test/X_test.csv` -> `data/dev/X_dev.csv`)."""
    if path.is_dir():
        if (path / split).is_dir():
            return _split_files(path, dev_split) if (path / dev_split).is_dir() else []
        return [f for f in _split_files(path, dev_split) if f.stem.endswith(f"_{dev_split}")]
    stem = path.stem.removesuffix(f"_{split}")
    candidates = [path.with_name(f"{stem}_{dev_split}{path.suffix}"),
                  path.parent.parent / dev_split / f"{stem}_{dev_split}{path.suffix}"]
    return [c for c in candidates if c.is_file() and c != path][:1]


def _subject_of(path: Path, split: str) -> str:
    return path.stem.removesuffix(f"_{split}")


def _header_names_question(path: Path, key: str) -> bool:
    with open(path, newline="", encoding="utf-8-sig", errors="replace") as f:
        first = next(csv.reader(f, delimiter="\t" if path.suffix.lower() == ".tsv" else ","), [])
    return key in first


def _mmlu_csv(path: Path) -> Iterator[Record]:
    """Headerless rows of an MMLU release file, as records {"row": [...]} with their line numbers."""
    delimiter = "\t" if path.suffix.lower() == ".tsv" else ","
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.reader(f, delimiter=delimiter)
        start = 1
        try:
            for values in reader:
                if any(v.strip() for v in values):
                    yield Record(str(path), start, {"row": values})
                start = reader.line_num + 1
        except UnicodeDecodeError as e:
            raise DataError(f"{path}: row {start}: not valid UTF-8 ({e.reason}); expected UTF-8 text") from None
        except csv.Error as e:
            raise DataError(f"{path}: row {reader.line_num}: malformed CSV: {e}") from None


# ------------------------------------------------------------------------------------------ conversion


def _fail(rec: Record, what: str) -> DataError:
    return DataError(f"{rec.source}: row {rec.row}: {what}")


def _text(rec: Record, key: str, value: Any) -> str:
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise _fail(rec, f"key '{key}': expected text, got {type(value).__name__}")
    return str(value)


def _answer(rec: Record, where: str, value: Any, n: int) -> int:
    """A 0-based index (an int, or digits in a CSV cell) or a letter; checked against the n choices."""
    expected = f"a letter {LETTERS[0]}-{LETTERS[n - 1]} or a 0-based index 0-{n - 1} ({n} choices)"
    if isinstance(value, str) and re.fullmatch(r"\s*\d+\s*", value):
        value = int(value)
    if isinstance(value, int) and not isinstance(value, bool):
        if 0 <= value < n:
            return value
    elif isinstance(value, str) and len(value.strip()) == 1 and value.strip().upper() in LETTERS[:n]:
        return LETTERS.index(value.strip().upper())
    raise _fail(rec, f"{where}: got {value!r}, expected {expected}")


def _from_csv_row(rec: Record, subject: str) -> tuple[str, str, tuple[str, ...], Any]:
    values = rec.data["row"]
    if len(values) < 4:
        raise _fail(rec, f"{len(values)} columns; expected a question, at least two choices and the answer letter "
                         "(MMLU's headerless layout)")
    question, *choices, answer = values
    return subject, question, tuple(choices), answer


def _from_record(rec: Record, cols: MCColumnsConfig, subject: str) -> tuple[str, str, tuple[str, ...], Any]:
    data = rec.data
    if not isinstance(data, dict):
        raise _fail(rec, f"expected a record (a mapping of keys), got {type(data).__name__}")

    def get(key: str, what: str) -> Any:
        if key not in data or data[key] is None:
            raise _fail(rec, f"missing key '{key}' ({what}); the record has keys: {', '.join(map(str, data)) or 'none'}")
        return data[key]

    question = _text(rec, cols.question, get(cols.question, "the question"))
    if isinstance(cols.choices, list):
        choices = tuple(_text(rec, k, get(k, "a choice")) for k in cols.choices)
    else:
        raw = get(cols.choices, "the list of choices")
        if isinstance(raw, str) and raw.lstrip().startswith("["):  # CSV and parquet columns store lists as JSON
            try:
                raw = json.loads(raw)
            except json.JSONDecodeError as e:
                raise _fail(rec, f"key '{cols.choices}': not valid JSON ({e.msg}); expected a list of choices") from None
        if hasattr(raw, "tolist"):  # numpy arrays from parquet
            raw = raw.tolist()
        if not isinstance(raw, (list, tuple)):
            raise _fail(rec, f"key '{cols.choices}': expected a list of choices, got {type(raw).__name__}")
        choices = tuple(_text(rec, cols.choices, c) for c in raw)
    if cols.subject in data and data[cols.subject] not in (None, ""):
        subject = _text(rec, cols.subject, data[cols.subject])
    return subject, question, choices, get(cols.answer, "the answer")


def _questions(records: Iterator[Record], kind: str, cols: MCColumnsConfig, default_subject: str) -> Iterator[Question]:
    for rec in records:
        if kind == "mmlu_csv":
            subject, question, choices, answer = _from_csv_row(rec, default_subject)
            answer_key = f"column {len(rec.data['row'])} (the answer)"
        else:
            subject, question, choices, answer = _from_record(rec, cols, default_subject)
            answer_key = f"key '{cols.answer}'"
        if len(choices) < 2 or len(choices) > len(LETTERS):
            raise _fail(rec, f"{len(choices)} choices; expected between 2 and {len(LETTERS)}")
        if not question.strip():
            raise _fail(rec, "empty question; expected text")
        if any(not c.strip() for c in choices):
            raise _fail(rec, f"choice {LETTERS[[c.strip() for c in choices].index('')]} is empty; expected text")
        index = _answer(rec, answer_key, answer, len(choices))
        ident = ""
        if kind == "records" and cols.id and isinstance(rec.data, dict) and rec.data.get(cols.id) not in (None, ""):
            ident = str(rec.data[cols.id])
        yield Question(ident, subject, question, choices, index, rec.source, rec.row)


def _kind(path: Path, task: MCTaskConfig) -> str:
    if task.format != "auto":
        return task.format
    if path.suffix.lower() in (".csv", ".tsv") and not _header_names_question(path, task.columns.question):
        return "mmlu_csv"
    return "records"


def _read(files: list[Path] | None, hub: str | None, split: str, task: MCTaskConfig) -> list[Question]:
    """Questions of local files (or of a hub split), ids assigned by subject and position where none is given."""
    out: list[Question] = []
    if files is not None:
        for f in files:
            kind = _kind(f, task)
            if kind == "mmlu_csv" and f.suffix.lower() not in (".csv", ".tsv"):
                raise DataError(f"{f}: format mmlu_csv reads .csv files, got {f.suffix}")
            records = _mmlu_csv(f) if kind == "mmlu_csv" else iter_file(f)
            out += _questions(records, kind, task.columns, _subject_of(f, split))
    else:
        out += _questions(iter_hub(hub or "", split, streaming=False, config=task.hub_config), "records", task.columns,
                          task.name)
    return _with_ids(out)


def _with_ids(questions: list[Question]) -> list[Question]:
    position: dict[str, int] = {}
    seen: dict[str, Question] = {}
    out = []
    for q in questions:
        n = position.get(q.subject, 0)
        position[q.subject] = n + 1
        ident = q.id or f"{q.subject}/{n}"
        if ident in seen:
            first = seen[ident]
            raise DataError(f"{q.source}: row {q.row}: question id {ident!r} repeats {first.source} row {first.row}; "
                            "ids must be unique")
        q = Question(ident, q.subject, q.question, q.choices, q.answer, q.source, q.row)
        seen[ident] = q
        out.append(q)
    return out


def _locate(path: str, split: str) -> tuple[list[Path] | None, str | None]:
    """(local files, None) or (None, hub name)."""
    p = Path(path).expanduser()
    if p.is_dir():
        files = _split_files(p, split)
        if not files:
            raise DataError(f"{p}: the folder holds no benchmark files for split {split!r}; expected .csv (MMLU "
                            f"layout: {split}/SUBJECT_{split}.csv), .json, .jsonl or .parquet files")
        return files, None
    if p.is_file():
        if p.suffix.lower() not in SUFFIXES:
            raise DataError(f"{p}: unsupported file type {p.suffix or '(none)'!r}; expected .csv, .json, .jsonl or .parquet")
        return [p], None
    if looks_local(path):
        raise DataError(f"{path}: no such file or folder")
    return None, path


def load_benchmark(task: MCTaskConfig) -> Benchmark:
    """The questions of `task` (subjects and limit applied) and their subjects' few-shot examples."""
    files, hub = _locate(task.path, task.split)
    questions = _read(files, hub, task.split, task)
    subjects = list(dict.fromkeys(q.subject for q in questions))
    if task.subjects:
        missing = [s for s in task.subjects if s not in subjects]
        if missing:
            raise DataError(f"{task.path}: no questions of subject(s) {', '.join(missing)}; the benchmark has: "
                            f"{', '.join(subjects)}")
        questions = [q for q in questions if q.subject in task.subjects]
    if task.limit:
        questions = _first_per_subject(questions, task.limit)
    shots, dev_files = _load_shots(task, files, hub, {q.subject for q in questions})
    return Benchmark(questions, shots, [*(files or []), *dev_files])


def _first_per_subject(questions: list[Question], limit: int) -> list[Question]:
    count: dict[str, int] = {}
    out = []
    for q in questions:
        count[q.subject] = count.get(q.subject, 0) + 1
        if count[q.subject] <= limit:
            out.append(q)
    return out


def _load_shots(task: MCTaskConfig, files: list[Path] | None, hub: str | None,
                subjects: set[str]) -> tuple[dict[str, list[Question]], list[Path]]:
    if task.shots == 0:
        return {}, []
    if task.dev_path:
        dev_files, dev_hub = _locate(task.dev_path, task.dev_split)
    elif files is not None:
        dev_files = sorted({d for f in ([Path(task.path)] if Path(task.path).is_dir() else files)
                            for d in _sibling_split(f, task.split, task.dev_split)})
        dev_hub = None
        if not dev_files:
            raise DataError(f"{task.path}: {task.shots}-shot needs examples, and no {task.dev_split!r} split was "
                            f"found next to it (MMLU layout: {task.dev_split}/SUBJECT_{task.dev_split}.csv); "
                            "set dev_path")
    else:
        dev_files, dev_hub = None, hub
    dev = _read(dev_files, dev_hub, task.dev_split, task)
    shots: dict[str, list[Question]] = {}
    for q in dev:
        shots.setdefault(q.subject, []).append(q)
    short = sorted(s for s in subjects if len(shots.get(s, [])) < task.shots)
    if short:
        have = ", ".join(f"{s} ({len(shots.get(s, []))})" for s in short[:5])
        raise DataError(f"{task.dev_path or task.path}: {task.shots}-shot needs {task.shots} {task.dev_split} "
                        f"examples per subject; too few for: {have}")
    return {s: shots[s][:task.shots] for s in subjects}, list(dev_files or [])
