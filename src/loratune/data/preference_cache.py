"""Tokenization cache of preference data: a rerun with the same files, settings and tokenizer does not re-tokenize.

As the SFT cache (`loratune.data.cache`), whose key it extends: the bytes of every file of the dataset, the
dataset's config section (columns, system, max_samples, split; not its weight), the template, the tokenizer and
the rendering's format version; plus the kind of records (pairs, or KTO's labelled completions, whose labels and
mismatched completions come from the files' bytes and order) and this cache's own format version. DPO, IPO,
ORPO, SimPO and reward models render pairs alike, so they share entries. What is cached is each record's two
rendered sides before length limits (chosen and rejected; or the completion and the mismatched completion),
its KTO label, and the pairs left out because both answers are the same (with where they are, for the warning),
so changing `data.max_length` or the truncation policy reuses it.

An entry is one .npz file (`pref-KEY.npz`: ids and a supervision mask of all sides end to end, offsets, a kind
per record), written to a temporary name and renamed, so a killed run never leaves a half-written entry behind.
"""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from loratune.config import DatasetConfig
from loratune.data import cache
from loratune.data.render import IGNORE
from loratune.data.templates import ChatTemplate
from loratune.model.load import TokenizerInfo

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
PAIR, IDENTICAL, DESIRABLE, UNDESIRABLE = 0, 1, 2, 3  # the kind of each record
Side = tuple[list[int], list[int]]  # (ids, labels) of one rendered sequence


@dataclass
class Rendered:
    """One dataset's preference records, rendered and tokenized, before length limits: each record's two sides
    (None for a pair whose answers are the same), its KTO label (None for pairs), and where the identical
    pairs are."""

    sides: list[tuple[Side, Side] | None]
    desirable: list[bool | None]
    identical: list[str]


def key(files: list[Path], ds: DatasetConfig, kind: str, template: ChatTemplate, tokenizer,
        info: TokenizerInfo) -> str:
    """The entry's key: the SFT cache's key of the same files, settings, template and tokenizer, with the record
    kind (`pairs` or `kto`) and this cache's format."""
    base = cache.key(files, ds, template, "last", cache.tokenizer_fingerprint(tokenizer, info))
    return hashlib.sha256(f"{base}:{kind}:{FORMAT_VERSION}".encode()).hexdigest()[:32]


def _path(k: str) -> Path:
    return cache.folder() / f"pref-{k}.npz"


def load(k: str) -> Rendered | None:
    """The entry `k`, or None when there is none (or it cannot be read: a miss, not an error)."""
    path = _path(k)
    if not path.is_file():
        return None
    try:
        with np.load(path) as z:
            ids, mask, offsets, kinds, where = z["ids"], z["mask"], z["offsets"], z["kinds"], z["identical"]
    except Exception as e:
        log.warning("ignoring unreadable data cache entry %s: %s", path, e)
        return None
    flat_ids, flat_labels = ids.tolist(), np.where(mask, ids, IGNORE).tolist()
    bounds = offsets.tolist()
    seqs = [(flat_ids[a:b], flat_labels[a:b]) for a, b in zip(bounds, bounds[1:])]
    kinds = kinds.tolist()
    sides: list[tuple[Side, Side] | None] = [None if c == IDENTICAL else (seqs[2 * i], seqs[2 * i + 1])
                                             for i, c in enumerate(kinds)]
    desirable = [True if c == DESIRABLE else False if c == UNDESIRABLE else None for c in kinds]
    return Rendered(sides, desirable, [str(x) for x in where.tolist()])


def save(k: str, data: Rendered) -> None:
    """Write entry `k` atomically (a temporary file renamed into place)."""
    seqs = [s for pair in data.sides for s in (pair if pair is not None else (([], []), ([], [])))]
    offsets = np.zeros(len(seqs) + 1, dtype=np.int64)
    offsets[1:] = np.cumsum([len(ids) for ids, _ in seqs])
    ids = np.fromiter((t for x, _ in seqs for t in x), dtype=np.int64, count=int(offsets[-1]))
    labels = np.fromiter((t for _, y in seqs for t in y), dtype=np.int64, count=int(offsets[-1]))
    kinds = np.array([IDENTICAL if s is None else PAIR if d is None else DESIRABLE if d else UNDESIRABLE
                      for s, d in zip(data.sides, data.desirable)], dtype=np.int8)
    out = cache.folder()
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / f"pref-{k}.tmp{os.getpid()}.npz"
    np.savez(tmp, ids=ids.astype(np.int32 if ids.max(initial=0) < 2**31 else np.int64), mask=labels != IGNORE,
             offsets=offsets, kinds=kinds, identical=np.array(data.identical, dtype=str))
    tmp.replace(_path(k))
