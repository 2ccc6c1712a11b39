"""Read dataset records from files, folders or the hub, one record at a time, with their row numbers.

Every reader is a generator of `Record`s, so a file larger than memory is never loaded whole: .json
arrays are decoded element by element from a sliding buffer (a .json file holding one object is read
whole, being one record). Row numbers are what a person finds in
an editor: the line for .jsonl/.csv/.tsv/.txt (the CSV header is row 1), the 1-based index for .json
arrays and .parquet. Anything unreadable raises `DataError` naming the file and the row.
"""

from __future__ import annotations

import codecs
import csv
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loratune.errors import DataError

SUFFIXES = (".json", ".jsonl", ".csv", ".tsv", ".parquet", ".txt")


@dataclass(frozen=True)
class Record:
    """One raw record and where it came from (for error messages)."""

    source: str
    row: int
    data: Any


def dataset_files(path: str) -> list[Path]:
    """The files a dataset path stands for: the file itself, or the supported files under a folder."""
    p = Path(path)
    if p.is_file():
        if p.suffix.lower() not in SUFFIXES:
            raise DataError(f"{p}: unsupported file type {p.suffix or '(none)'!r}; expected one of {', '.join(SUFFIXES)}")
        return [p]
    if p.is_dir():
        files = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in SUFFIXES
                       and not any(part.startswith(".") for part in f.relative_to(p).parts))
        if not files:
            raise DataError(f"{p}: the folder holds no dataset files; expected {', '.join(SUFFIXES)} files")
        return files
    raise DataError(f"{path}: no such file or folder")


def looks_local(path: str) -> bool:
    """Whether a dataset path that does not exist was meant as a local path rather than a hub name."""
    return (Path(path).suffix.lower() in SUFFIXES or path.startswith((".", "/", "~")) or os.sep + os.sep in path
            or path.count("/") > 1 or "\\" in path)


def iter_file(path: Path) -> Iterator[Record]:
    """Records of one file, by its suffix."""
    readers = {".json": _json, ".jsonl": _jsonl, ".csv": _csv, ".tsv": _csv, ".parquet": _parquet, ".txt": _txt}
    if path.stat().st_size == 0:
        raise DataError(f"{path}: the file is empty; expected at least one record")
    n = 0
    for rec in readers[path.suffix.lower()](path):
        n += 1
        yield rec
    if n == 0:
        raise DataError(f"{path}: the file holds no records (only blank lines or a header); expected at least one record")


def iter_hub(name: str, split: str, streaming: bool, config: str | None = None) -> Iterator[Record]:
    """Records of a hub dataset through `datasets` (`config`: the dataset's configuration, a subset such as MMLU's
    `all`); fails clearly when there is no network."""
    if os.environ.get("HF_DATASETS_OFFLINE") == "1" or os.environ.get("HF_HUB_OFFLINE") == "1":
        raise DataError(f"{name}: no such file or folder, and the hub is offline (HF_DATASETS_OFFLINE/HF_HUB_OFFLINE "
                        "is set), so it cannot be loaded as a hub dataset")
    try:
        import datasets
    except ImportError:  # an optional dependency: say which extra brings it
        raise DataError(f"{name}: no such file or folder; loading it as a hub dataset needs the `datasets` "
                        "package: pip install 'loratune[data]'") from None
    try:
        ds = datasets.load_dataset(*(name,) if config is None else (name, config), split=split, streaming=streaming)
        source = f"{name}[{split}]" if config is None else f"{name}:{config}[{split}]"
        for i, row in enumerate(ds):
            yield Record(source, i + 1, row)
    except DataError:
        raise
    except Exception as e:  # datasets raises many types (ConnectionError, FileNotFoundError, ValueError...)
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DataError(f"{name}: no such file or folder, and loading it as a hub dataset failed: {first}") from None


def _decode(raw: bytes, source: Path, row: int) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{source}: row {row}: not valid UTF-8 (byte 0x{raw[e.start]:02x} at column {e.start + 1}); "
                        "expected UTF-8 text") from None


def _lines(path: Path) -> Iterator[tuple[int, str]]:
    """(line number, text) of a file, decoded strictly line by line so a bad byte is located."""
    with open(path, "rb") as f:
        for no, raw in enumerate(f, 1):
            if no == 1 and raw.startswith(b"\xef\xbb\xbf"):  # a UTF-8 byte-order mark (Excel, Notepad)
                raw = raw[3:]
            yield no, _decode(raw, path, no)


def _jsonl(path: Path) -> Iterator[Record]:
    for no, line in _lines(path):
        if line.strip():
            yield Record(str(path), no, _loads(line, path, no))


def _loads(text: str, path: Path, row: int) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: row {row}: not valid JSON ({e.msg} at column {e.colno}); expected one JSON object "
                        "per line") from None


BLOCK = 1 << 20  # bytes read at a time from a .json array


def _json(path: Path) -> Iterator[Record]:
    with open(path, "rb") as f:
        head = f.read(4096).lstrip(b"\xef\xbb\xbf \t\r\n")
    if head.startswith(b"["):
        yield from _json_array(path)
        return
    raw = path.read_bytes()  # one object (or JSON Lines under a .json name, streamed below)
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise _utf8_error(path, e.start, raw[e.start]) from None
    if not text.strip():
        raise DataError(f"{path}: the file is empty; expected at least one record")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        if e.msg == "Extra data":  # several JSON values, one per line: JSON Lines under a .json name
            yield from _jsonl(path)
            return
        raise DataError(f"{path}: not valid JSON ({e.msg} at line {e.lineno}, column {e.colno}); expected a JSON "
                        "array of records") from None
    if not isinstance(data, dict):
        kinds = {int: "a number", float: "a number", str: "a string", bool: "true/false", type(None): "null"}
        raise DataError(f"{path}: expected a JSON array of records, got {kinds.get(type(data), type(data).__name__)}")
    yield Record(str(path), 1, data)


def _utf8_error(path: Path, at: int, byte: int) -> DataError:
    """A bad byte at absolute offset `at`, located by line and column (counting lines only on this error path)."""
    line, col, done = 1, 1, 0
    with open(path, "rb") as f:
        while done < at:
            block = f.read(min(BLOCK, at - done))
            line += block.count(b"\n")
            col = len(block) - block.rfind(b"\n") if b"\n" in block else col + len(block)
            done += len(block)
    return DataError(f"{path}: row {line}: not valid UTF-8 (byte 0x{byte:02x} at line {line}, column {col}); "
                     "expected UTF-8 text")


class _Text:
    """The decoded text of a binary file, a block at a time: `buf[pos:]` is what is not consumed yet."""

    def __init__(self, f, path: Path) -> None:
        self.f, self.path = f, path
        self.utf8 = codecs.getincrementaldecoder("utf-8")()
        self.buf, self.pos, self.fed, self.eof = "", 0, 0, False
        self.line_base, self.col_base = 0, 0  # where buf starts in the file, for error positions

    def more(self) -> None:
        """Drop the consumed text (counting its lines) and decode the next block."""
        dropped = self.buf[:self.pos]
        if "\n" in dropped:
            self.line_base += dropped.count("\n")
            self.col_base = len(dropped) - dropped.rfind("\n") - 1
        else:
            self.col_base += len(dropped)
        block = self.f.read(BLOCK)
        pending = self.utf8.getstate()[0]
        try:
            text = self.utf8.decode(block, final=not block)
        except UnicodeDecodeError as e:
            raise _utf8_error(self.path, self.fed - len(pending) + e.start, (pending + block)[e.start]) from None
        if self.fed - len(pending) <= 0 and text.startswith("\ufeff"):  # a byte-order mark opens the file
            text = text[1:]
        self.fed += len(block)
        self.buf, self.pos, self.eof = self.buf[self.pos:] + text, 0, not block

    def peek(self) -> str | None:
        """The next non-space character (not consumed), or None at the end of the file."""
        while True:
            while self.pos < len(self.buf) and self.buf[self.pos] in " \t\r\n":
                self.pos += 1
            if self.pos < len(self.buf):
                return self.buf[self.pos]
            if self.eof:
                return None
            self.more()

    def value(self, decoder: json.JSONDecoder) -> Any:
        """Decode the JSON value at `pos`, reading more blocks while it may go on past the buffer."""
        while True:
            try:
                value, end = decoder.raw_decode(self.buf, self.pos)
                if end < len(self.buf) or self.eof:  # else a number may go on in the next block
                    self.pos = end
                    return value
            except json.JSONDecodeError as e:
                if self.eof:
                    raise self.error(e.msg, e.pos) from None
            self.more()

    def error(self, what: str, at: int | None = None) -> DataError:
        at = self.pos if at is None else at
        line = self.buf.count("\n", 0, at)
        col = at - self.buf.rfind("\n", 0, at) if line else self.col_base + at + 1
        return DataError(f"{self.path}: not valid JSON ({what} at line {self.line_base + line + 1}, column {col}); "
                         "expected a JSON array of records")


def _json_array(path: Path) -> Iterator[Record]:
    """The records of a JSON array, one at a time, never holding more than a block and one record."""
    decoder = json.JSONDecoder()
    with open(path, "rb") as f:
        t = _Text(f, path)
        if t.peek() != "[":
            raise t.error("expected '['")
        t.pos += 1
        row, expect_value = 0, True
        while True:
            ch = t.peek()
            if ch is None:
                raise t.error("unterminated array: no closing ']'")
            if ch == "]" and (row == 0 or not expect_value):
                t.pos += 1
                if t.peek() is not None:
                    raise t.error("extra data after the array")
                return
            if not expect_value:
                if ch != ",":
                    raise t.error("expected ',' or ']'")
                t.pos, expect_value = t.pos + 1, True
                continue
            value = t.value(decoder)
            row += 1
            yield Record(str(path), row, value)
            expect_value = False


def _csv(path: Path) -> Iterator[Record]:
    lines = _lines(path)
    delimiter = "\t" if path.suffix.lower() == ".tsv" else ","
    reader = csv.reader((text for _, text in lines), delimiter=delimiter)
    try:
        header = next(reader)
        start = reader.line_num + 1
        for values in reader:
            if any(v.strip() for v in values):
                if len(values) != len(header):
                    raise DataError(f"{path}: row {start}: {len(values)} columns, expected {len(header)} as in the "
                                    f"header ({', '.join(header)})")
                yield Record(str(path), start, dict(zip(header, values)))
            start = reader.line_num + 1
    except StopIteration:
        return
    except csv.Error as e:
        raise DataError(f"{path}: row {reader.line_num}: malformed {'TSV' if delimiter == chr(9) else 'CSV'}: {e}") from None


def _parquet(path: Path) -> Iterator[Record]:
    try:
        import pyarrow.parquet as pq

        pf = pq.ParquetFile(path)
    except ImportError:
        raise DataError(f"{path}: reading .parquet needs the `pyarrow` package: pip install 'loratune[data]'") from None
    except Exception as e:
        raise DataError(f"{path}: not a readable Parquet file: {str(e).splitlines()[0]}") from None
    row = 0
    for batch in pf.iter_batches(batch_size=1024):
        for rec in batch.to_pylist():
            row += 1
            yield Record(str(path), row, rec)


def _txt(path: Path) -> Iterator[Record]:
    """Plain text for continued pretraining: one document per blank-line-separated paragraph."""
    para: list[str] = []
    first = 0
    for no, line in _lines(path):
        if line.strip():
            first = first or no
            para.append(line)
        elif para:
            yield Record(str(path), first, {"text": "".join(para).rstrip("\n")})
            para, first = [], 0
    if para:
        yield Record(str(path), first, {"text": "".join(para).rstrip("\n")})
