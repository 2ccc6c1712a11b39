"""Tokenization cache: a rerun with the same files, settings and tokenizer does not re-tokenize.

The key hashes everything the tokenized result depends on: the bytes of every file of the dataset, the
dataset's config section, the template (Jinja and stop text), `train_on`, the tokenizer (its full
serialisation and special tokens) and `FORMAT_VERSION`, bumped whenever rendering changes. What is
cached is the result *before* length limits (truncation, packing), so changing `max_length` reuses it.

An entry is one .npz file (ids and a supervision mask, concatenated, plus offsets), written to a
temporary name and renamed, so a killed run never leaves a half-written entry behind.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from pathlib import Path

import numpy as np

from loratune.config import DatasetConfig
from loratune.data.render import IGNORE
from loratune.data.templates import ChatTemplate
from loratune.model.load import TokenizerInfo, cache_dir

log = logging.getLogger(__name__)

FORMAT_VERSION = 3  # 2: built-in templates render tools and tool calls; 3: labels from one whole rendering, template variables


@dataclasses.dataclass
class Tokenized:
    """The tokenized records of one dataset, before length limits."""

    ids: list[list[int]]
    labels: list[list[int]]
    is_text: list[bool]
    records: int
    fmt: str = ""  # the format the records were read as


def tokenizer_fingerprint(tokenizer, info: TokenizerInfo) -> str:
    h = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    h.update(backend.to_str().encode() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    h.update(json.dumps([type(tokenizer).__name__, tokenizer.special_tokens_map, dataclasses.asdict(info)],
                        sort_keys=True, default=str).encode())
    return h.hexdigest()


def key(files: list[Path], ds: DatasetConfig, template: ChatTemplate, train_on: str, tok_fp: str) -> str:
    h = hashlib.sha256()
    for f in files:
        h.update(str(f.name).encode() + b"\0")
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    section = {k: v for k, v in dataclasses.asdict(ds).items() if k != "weight"}  # weights apply after the cache
    h.update(json.dumps([FORMAT_VERSION, section, template.jinja, template.stop, template.variables, train_on, tok_fp],
                        sort_keys=True, default=str).encode())
    return h.hexdigest()[:32]


def folder() -> Path:
    return cache_dir() / "data"


def load(k: str) -> Tokenized | None:
    path = folder() / f"{k}.npz"
    if not path.is_file():
        return None
    try:
        with np.load(path) as z:
            ids, mask, offsets, is_text = z["ids"], z["mask"], z["offsets"], z["is_text"]
            records, fmt = int(z["records"]), str(z["fmt"])
    except Exception as e:  # a corrupt entry is a cache miss, not an error
        log.warning("ignoring unreadable data cache entry %s: %s", path, e)
        return None
    labels = np.where(mask, ids, IGNORE)
    bounds = offsets.tolist()
    flat_ids, flat_labels = ids.tolist(), labels.tolist()
    return Tokenized([flat_ids[a:b] for a, b in zip(bounds, bounds[1:])],
                     [flat_labels[a:b] for a, b in zip(bounds, bounds[1:])], is_text.tolist(), records, fmt)


def save(k: str, tok: Tokenized) -> None:
    out = folder()
    out.mkdir(parents=True, exist_ok=True)
    offsets = np.zeros(len(tok.ids) + 1, dtype=np.int64)
    offsets[1:] = np.cumsum([len(x) for x in tok.ids])
    flat_ids = np.fromiter((t for x in tok.ids for t in x), dtype=np.int64, count=int(offsets[-1]))
    flat_labels = np.fromiter((t for x in tok.labels for t in x), dtype=np.int64, count=int(offsets[-1]))
    tmp = out / f"{k}.tmp{os.getpid()}.npz"
    np.savez(tmp, ids=flat_ids.astype(np.int32 if flat_ids.max(initial=0) < 2**31 else np.int64),
             mask=flat_labels != IGNORE, offsets=offsets, is_text=np.array(tok.is_text, dtype=bool),
             records=np.array(tok.records), fmt=np.array(tok.fmt))
    tmp.replace(out / f"{k}.npz")
