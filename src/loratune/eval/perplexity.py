"""Perplexity and bits per byte of held-out text.

Each document is encoded without special tokens and scored after one prefix token (BOS, or EOS for a
tokenizer without BOS), so every token of the text is predicted and nothing else is. A document longer
than the window is scored in windows: the first predicts its first `max_length` tokens; each later one
predicts the next `stride` tokens, conditioned on up to `max_length` tokens before them. With stride =
max_length (the default) this is lm-evaluation-harness's `loglikelihood_rolling`; a smaller stride gives
each prediction more context, at more compute.

Token perplexity depends on the tokenizer, so models with different tokenizers are compared by bits per
byte: the total negative log-likelihood in bits over the text's UTF-8 bytes. Word perplexity (per
whitespace-separated word) is reported too. Intervals resample documents.

On loratune's decoder the windows of a batch run as one padding-free stream and the output head only on the
scored positions; on a transformers model as padded rows.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from loratune.data.readers import Record, dataset_files, iter_file, iter_hub, looks_local
from loratune.decoder.attention import Boundaries
from loratune.decoder.model import Decoder
from loratune.errors import DataError
from loratune.eval.stats import ratio_ci
from loratune.eval.store import ResultStore


@dataclass(frozen=True)
class Document:
    id: str
    text: str
    source: str
    row: int


def read_documents(path: str, *, text_key: str, split: str = "test", limit: int = 0) -> tuple[list[Document], list[Path]]:
    """The documents of a text file, folder or hub dataset (the first `limit`), and the local files read."""
    if Path(path).exists():
        files = dataset_files(path)
        records: Iterator[Record] = (r for f in files for r in iter_file(f))
    elif looks_local(path):
        raise DataError(f"{path}: no such file or folder")
    else:
        files, records = [], iter_hub(path, split, streaming=False)
    docs = []
    for rec in records:
        if limit and len(docs) >= limit:
            break
        data = rec.data
        if not isinstance(data, dict) or text_key not in data:
            keys = ", ".join(map(str, data)) if isinstance(data, dict) else type(data).__name__
            raise DataError(f"{rec.source}: row {rec.row}: missing key '{text_key}' (the text; set text_key); the "
                            f"record has: {keys}")
        if not isinstance(data[text_key], str):
            raise DataError(f"{rec.source}: row {rec.row}: key '{text_key}': expected text, got {type(data[text_key]).__name__}")
        if data[text_key].strip():
            docs.append(Document(str(len(docs)), data[text_key], rec.source, rec.row))
    if not docs:
        raise DataError(f"{path}: no text found")
    return docs, files


def windows(n: int, max_length: int, stride: int) -> list[tuple[int, int, int]]:
    """(input start, input end, targets) over the sequence [prefix, t1..tn]: the window reads positions
    [start, end) and scores its last `targets` predictions (of tokens end-targets+1 .. end)."""
    if n == 0:
        return []
    out, b = [], min(n, max_length) + 1  # targets are positions 1..n of the sequence
    out.append((0, b - 1, b - 1))
    while b <= n:
        a, b = b, min(n + 1, b + stride)
        start = max(0, b - 1 - max_length)
        out.append((start, b - 1, b - a))
    return out


def prefix_token(tokenizer) -> int:
    return tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id


@torch.inference_mode()
def document_nll(model: torch.nn.Module, token_lists: Sequence[list[int]], prefix: int, *, max_length: int,
                 stride: int, batch_size: int) -> list[float]:
    """Negative log-likelihood (nats) of each token list after `prefix`, windows batched across documents."""
    device = next(model.parameters()).device
    jobs = [(d, seq, w) for d, tokens in enumerate(token_lists)
            for seq in [[prefix, *tokens]] for w in windows(len(tokens), max_length, stride)]
    nll = [0.0] * len(token_lists)
    for s in range(0, len(jobs), batch_size):
        part = jobs[s:s + batch_size]
        if isinstance(model, Decoder):
            for (d, _, _), value in zip(part, _windows_on_decoder(model, part)):
                nll[d] += value
            continue
        width = max(end - start for _, _, (start, end, _) in part)
        ids = torch.zeros((len(part), width), dtype=torch.long, device=device)
        mask = torch.zeros((len(part), width), dtype=torch.long, device=device)
        for i, (_, seq, (start, end, _)) in enumerate(part):
            ids[i, :end - start] = torch.tensor(seq[start:end], device=device)
            mask[i, :end - start] = 1
        logits = model(input_ids=ids, attention_mask=mask).logits
        for i, (d, seq, (start, end, targets)) in enumerate(part):
            length = end - start
            lp = F.log_softmax(logits[i, length - targets:length].float(), dim=-1)
            want = torch.tensor(seq[end - targets + 1:end + 1], device=device)
            nll[d] -= float(lp.gather(1, want.unsqueeze(1)).sum())
    return nll


def _windows_on_decoder(decoder: Decoder, part: list[tuple[int, list[int], tuple[int, int, int]]]) -> list[float]:
    """NLL of each window's scored tokens on loratune's decoder: the windows laid end to end in one padding-free
    stream, the output head run only on the positions whose predictions are scored."""
    device = decoder.device
    ids = torch.tensor([t for _, seq, (start, end, _) in part for t in seq[start:end]], dtype=torch.long, device=device)
    lengths = [end - start for _, _, (start, end, _) in part]
    hidden = decoder.hidden_states(ids, Boundaries.from_lengths(lengths, device))
    rows, want = [], []
    offset = 0
    for (_, seq, (start, end, targets)), length in zip(part, lengths):
        rows += range(offset + length - targets, offset + length)
        want += seq[end - targets + 1:end + 1]
        offset += length
    lp = F.log_softmax(decoder.logits(hidden[torch.tensor(rows, device=device)]).float(), dim=-1)
    picked = lp.gather(1, torch.tensor(want, dtype=torch.long, device=device).unsqueeze(1)).squeeze(1)
    out, start = [], 0
    for _, _, (_, _, targets) in part:
        out.append(-float(picked[start:start + targets].sum()))
        start += targets
    return out


def score_documents(model: torch.nn.Module, tokenizer, docs: Sequence[Document], *, max_length: int, stride: int,
                    batch_size: int, store: ResultStore, advance: Callable[[int], None] | None = None) -> list[dict]:
    """Per-document records {"id", "nll", "tokens", "bytes", "words"}, cached in `store` a batch at a time."""
    todo = [d for d in docs if d.id not in store]
    prefix = prefix_token(tokenizer)
    for s in range(0, len(todo), batch_size):
        part = todo[s:s + batch_size]
        tokens = [list(tokenizer(d.text, add_special_tokens=False).input_ids) for d in part]
        nll = document_nll(model, tokens, prefix, max_length=max_length, stride=stride, batch_size=batch_size)
        store.add([{"id": d.id, "nll": v, "tokens": len(t), "bytes": len(d.text.encode("utf-8")),
                    "words": len(d.text.split())} for d, t, v in zip(part, tokens, nll)])
        if advance is not None:
            advance(len(part))
    return [store.get(d.id) for d in docs]  # type: ignore[misc]


def summarize(records: Sequence[dict], *, resamples: int, confidence: float, seed: int) -> dict:
    nll = [r["nll"] for r in records]
    kw = dict(resamples=resamples, confidence=confidence, seed=seed)
    return {"n": len(records), "tokens": sum(r["tokens"] for r in records), "bytes": sum(r["bytes"] for r in records),
            "metrics": {
                "perplexity": ratio_ci(nll, [r["tokens"] for r in records], math.exp, **kw).to_json(),
                "bits_per_byte": ratio_ci(nll, [r["bytes"] for r in records], lambda x: x / math.log(2), **kw).to_json(),
                "word_perplexity": ratio_ci(nll, [r["words"] for r in records], math.exp, **kw).to_json()}}
