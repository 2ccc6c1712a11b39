"""Fit tokenized samples to the length limits: truncation policies, text chunking, and drops.

Each function returns the samples it keeps and an outcome name that the pipeline counts, so nothing is
cut or dropped silently:

- `ok`: unchanged; `truncated`: shortened; `split`: a long plain text cut into several chunks;
- `too_long` (dropped under `truncation: drop`), `no_supervised` (dropped: no token carries loss).

Conversations: the *source* is everything before the first supervised token, the *target* the rest
(qlora.py's split). `source_max_length` keeps BOS and the source tokens nearest the answer;
`target_max_length` cuts the target's end. Over `max_length`, `prompt_first` removes the oldest source
tokens (after BOS) down to a floor of max_length/4, then cuts the end; `end` cuts the end.

Plain texts (continued pretraining) are split into chunks of max_length that overlap by one token, so
every token is a training target exactly once (a chunk's first token is never a target).
"""

from __future__ import annotations

from loratune.config import DataConfig
from loratune.data.render import IGNORE

Pair = tuple[list[int], list[int]]


def has_targets(labels: list[int]) -> bool:
    """Whether any token after the first carries loss (the first is never predicted)."""
    return any(label != IGNORE for label in labels[1:])


def split_text(ids: list[int], labels: list[int], max_length: int) -> tuple[list[Pair], str]:
    if len(ids) <= max_length:
        return [(ids, labels)], "ok"
    step = max_length - 1
    chunks = []
    for start in range(0, len(ids) - 1, step):
        c_ids, c_labels = ids[start:start + max_length], list(labels[start:start + max_length])
        c_labels[0] = IGNORE
        chunks.append((c_ids, c_labels))
    return chunks, "split"


def _first_target(labels: list[int]) -> int:
    return next((i for i, label in enumerate(labels) if label != IGNORE), len(labels))


def fit_conversation(ids: list[int], labels: list[int], cfg: DataConfig, bos_id: int | None) -> tuple[list[Pair], str]:
    """Apply source/target limits and the truncation policy to one rendered conversation."""
    if not has_targets(labels):
        return [], "no_supervised"
    n = len(ids)
    head = 1 if bos_id is not None and ids and ids[0] == bos_id else 0
    src = _first_target(labels)
    if cfg.source_max_length and src > cfg.source_max_length:
        keep = max(cfg.source_max_length - head, 0)
        ids, labels = ids[:head] + ids[src - keep:], labels[:head] + labels[src - keep:]
        src = head + keep
    if cfg.target_max_length and len(ids) - src > cfg.target_max_length:
        ids, labels = ids[:src + cfg.target_max_length], labels[:src + cfg.target_max_length]
    excess = len(ids) - cfg.max_length
    if excess > 0:
        if cfg.truncation == "drop":
            return [], "too_long"
        if cfg.truncation == "prompt_first":
            floor = max(min(src, cfg.max_length // 4), head)
            cut = max(min(excess, src - floor), 0)
            ids, labels = ids[:head] + ids[head + cut:], labels[:head] + labels[head + cut:]
        ids, labels = ids[:cfg.max_length], labels[:cfg.max_length]
    if len(ids) == n:
        return [(ids, labels)], "ok"
    labels = [IGNORE, *labels[1:]]
    if not has_targets(labels):
        return [], "no_supervised"
    return [(ids, labels)], "truncated"


def fit(ids: list[int], labels: list[int], is_text: bool, cfg: DataConfig, bos_id: int | None) -> tuple[list[Pair], str]:
    """The samples one tokenized record becomes, and what happened to it."""
    if is_text:
        return split_text(ids, labels, cfg.max_length) if has_targets(labels) else ([], "no_supervised")
    return fit_conversation(ids, labels, cfg, bos_id)
