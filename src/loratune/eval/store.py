"""What makes an eval resumable: per-item results on disk, appended as they are computed.

Each (model, task) pair has one JSON Lines file under `OUTPUT/cache/MODEL/`, named after the task and a
fingerprint of everything its results depend on (the model's files, the task's settings, the data's
bytes). A batch of results is appended as whole lines and flushed to disk before the next batch starts;
a kill can at worst leave a torn last line, which the next run drops (and says so). A rerun reads what
is there and computes only the items missing, so a stopped eval continues where it stopped, and a
changed setting gets a new file instead of mixing old and new results.

Reports are written atomically (a temporary file renamed over the old one): a reader sees the old
report or the new, never half of one.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


def fingerprint(*parts: Any) -> str:
    """A short stable hash of JSON-serialisable parts."""
    text = json.dumps(parts, sort_keys=True, default=str, ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def file_digest(paths: Iterable[Path]) -> str:
    """A hash of files' contents (benchmark and test files are small next to a model)."""
    h = hashlib.sha256()
    for p in sorted(Path(x) for x in paths):
        h.update(str(p.name).encode())
        with open(p, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()[:16]


def write_text_atomic(path: Path, text: str) -> None:
    """Write a text file so that readers see the old content or the new, never a torn one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with tmp.open("w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class ResultStore:
    """Results of one (model, task): a JSON Lines file of `{"id": ..., ...}` records, appended per batch."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.results: dict[str, dict] = {}
        if path.is_file():
            self._load()

    def _load(self) -> None:
        raw = self.path.read_bytes()
        good = 0  # bytes up to the end of the last complete, valid line
        for line in raw.splitlines(keepends=True):
            if not line.endswith(b"\n"):
                break
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                break
            self.results[str(rec["id"])] = rec
            good += len(line)
        if good < len(raw):
            log.warning("%s: dropped a torn last record (the previous run was stopped while writing it)", self.path)
            with open(self.path, "r+b") as f:
                f.truncate(good)

    def __contains__(self, item_id: str) -> bool:
        return item_id in self.results

    def __len__(self) -> int:
        return len(self.results)

    def get(self, item_id: str) -> dict | None:
        return self.results.get(item_id)

    def add(self, records: list[dict]) -> None:
        """Append records (each with an `id`) and flush them to disk before returning."""
        if not records:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        for r in records:
            self.results[str(r["id"])] = r


def store_for(out_dir: Path, model: str, task: str, key: str) -> ResultStore:
    """The cache of `task` results of `model`, for the settings whose fingerprint is `key`."""
    return ResultStore(out_dir / "cache" / model / f"{task}-{key}.jsonl")
