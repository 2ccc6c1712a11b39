"""Log-likelihood of continuations given contexts, batched, with shared prefixes computed once.

The multiple-choice workload is many (context, continuation) pairs in which contexts repeat (one per
choice) and share long prefixes (the few-shot examples of a subject). Scored naively, as
lm-evaluation-harness does, each pair is a full forward over context + continuation: a 5-shot MMLU
question costs 4 forwards over ~600 tokens. Here:

    sorted unique contexts, in chunks of `batch_size`
      ├─ prefix  : the chunk's common token prefix (the shots), one forward, its KV cache kept    (once)
      ├─ contexts: each context's remaining tokens, left-padded after the prefix, one forward on a
      │            copy of the prefix cache expanded to the chunk; the last position's log-probs
      │            give every continuation's first token                                          (per chunk)
      └─ continuations longer than one token: their tokens after the context, on a copy of the
                   context cache with each row selected per continuation                         (per choice)

Sharing is exact: a token's keys and values depend only on the tokens before it, and the positions and
attention masks are those of the unshared sequence (padding between the prefix and a context's own
tokens is masked by position). `score_reference` is the plain path, one full forward per pair, and the
tests check the two agree. Log-probabilities are taken in float32.

The KV cache is a `transformers.DynamicCache` used through its public methods: a copy (`copy.deepcopy`)
is made before each forward that extends it, and `batch_select_indices` gives each row its context.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from loratune.infer.engine import cache_keyword, new_cache


@dataclass(frozen=True)
class Request:
    """Token ids of a context and of the continuation scored after it."""

    context: tuple[int, ...]
    continuation: tuple[int, ...]


@dataclass(frozen=True)
class Score:
    logprob: float  # sum of the continuation tokens' log-probabilities
    greedy: bool  # every continuation token is the model's argmax
    first: float  # log-probability of the continuation's first token (answer-letter scoring)


def truncate(req: Request, max_length: int) -> tuple[Request, bool]:
    """Cut the context from the left so that context + continuation fits `max_length` + 1 tokens (the last
    token is never an input), as lm-evaluation-harness does; returns the request and whether it was cut."""
    excess = len(req.context) + len(req.continuation) - (max_length + 1)
    if excess <= 0:
        return req, False
    if len(req.continuation) > max_length:
        raise ValueError(f"a continuation of {len(req.continuation)} tokens does not fit {max_length} tokens")
    return Request(req.context[excess:], req.continuation), True


def _device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def common_prefix(rows: Sequence[tuple[int, ...]]) -> int:
    first, n = rows[0], min(len(r) for r in rows)
    for r in rows[1:]:
        i = 0
        while i < n and r[i] == first[i]:
            i += 1
        n = i
    return n


def by_context(requests: Sequence[Request]) -> dict[tuple[int, ...], list[int]]:
    """{context: indices of its requests}; every request must have a non-empty context and continuation."""
    if any(not r.context or not r.continuation for r in requests):
        raise ValueError("every request needs a non-empty context and continuation")
    grouped: dict[tuple[int, ...], list[int]] = {}
    for i, r in enumerate(requests):
        grouped.setdefault(r.context, []).append(i)
    return grouped


def _expanded(cache, rows: torch.Tensor):
    """A copy of `cache` whose batch holds row `rows[i]` of the original at position i."""
    out = copy.deepcopy(cache)
    out.batch_select_indices(rows)
    return out


class _Prefix:
    """The KV cache of one token prefix, kept while consecutive chunks share it."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model, self.keyword = model, cache_keyword(model)
        self.tokens: tuple[int, ...] = ()
        self.cache = None

    def get(self, tokens: tuple[int, ...]):
        if tokens != self.tokens:
            device = _device(self.model)
            ids = torch.tensor([tokens], dtype=torch.long, device=device)
            cache = new_cache(self.model)
            self.model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=True, logits_to_keep=1,
                       position_ids=torch.arange(len(tokens), device=device).unsqueeze(0), **{self.keyword: cache})
            if cache.get_seq_length() != len(tokens):
                raise RuntimeError(f"{type(self.model).__name__} did not fill the KV cache passed as `{self.keyword}`")
            self.tokens, self.cache = tokens, cache
        return self.cache


def _contexts_forward(model: torch.nn.Module, keyword: str, contexts: list[tuple[int, ...]], shared: int,
                      prefix_cache, keep_cache: bool):
    """Forward each context's tokens after the shared prefix; returns (cache, attention mask, (Q, V) log-probs
    at each context's last token)."""
    device = _device(model)
    rest = [c[shared:] for c in contexts]
    width = max(len(r) for r in rest)
    ids = torch.zeros((len(rest), width), dtype=torch.long, device=device)
    mask = torch.zeros((len(rest), width), dtype=torch.long, device=device)
    for i, r in enumerate(rest):  # left-padded: every context ends in the last column
        ids[i, width - len(r):] = torch.tensor(r, dtype=torch.long, device=device)
        mask[i, width - len(r):] = 1
    positions = shared + (mask.cumsum(dim=1) - 1).clamp(min=0)
    attention = torch.cat([torch.ones((len(rest), shared), dtype=torch.long, device=device), mask], dim=1)
    rows = torch.zeros(len(rest), dtype=torch.long, device=device)
    cache = _expanded(prefix_cache, rows) if prefix_cache is not None else (new_cache(model) if keep_cache else None)
    kwargs = {keyword: cache} if cache is not None else {}
    out = model(input_ids=ids, attention_mask=attention, position_ids=positions, use_cache=cache is not None,
                logits_to_keep=1, **kwargs)
    return cache, attention, F.log_softmax(out.logits[:, -1, :].float(), dim=-1)


def _continuations_forward(model: torch.nn.Module, keyword: str, cache, attention: torch.Tensor,
                           rows: list[int], lengths: list[int], conts: list[tuple[int, ...]]) -> list[tuple[float, bool]]:
    """(sum of log-probs, greedy) of tokens 2.. of each continuation, after context row `rows[i]`."""
    device = _device(model)
    width = max(len(c) - 1 for c in conts)
    ids = torch.zeros((len(conts), width), dtype=torch.long, device=device)
    mask = torch.zeros((len(conts), width), dtype=torch.long, device=device)
    for i, c in enumerate(conts):  # right-padded: padding after the last input is never attended to
        ids[i, :len(c) - 1] = torch.tensor(c[:-1], dtype=torch.long, device=device)
        mask[i, :len(c) - 1] = 1
    index = torch.tensor(rows, dtype=torch.long, device=device)
    start = torch.tensor(lengths, dtype=torch.long, device=device)
    positions = start.unsqueeze(1) + torch.arange(width, device=device).unsqueeze(0)
    out = model(input_ids=ids, attention_mask=torch.cat([attention[index], mask], dim=1), position_ids=positions,
                use_cache=True, **{keyword: _expanded(cache, index)})
    logprobs = F.log_softmax(out.logits.float(), dim=-1)
    results = []
    for i, c in enumerate(conts):
        targets = torch.tensor(c[1:], dtype=torch.long, device=device)
        lp = logprobs[i, :len(c) - 1]
        results.append((float(lp.gather(1, targets.unsqueeze(1)).sum()), bool((lp.argmax(dim=-1) == targets).all())))
    return results


class Scorer:
    """Scores batches of requests on one model, keeping the last shared prefix's cache between calls (the
    next block of questions of the same subject reuses its shots)."""

    def __init__(self, model: torch.nn.Module, *, batch_size: int = 8, share_prefix: bool = True) -> None:
        self.model, self.batch_size, self.share_prefix = model, batch_size, share_prefix
        self.keyword = cache_keyword(model)
        self.prefix = _Prefix(model)

    @torch.inference_mode()
    def score(self, requests: Sequence[Request], progress: Callable[[int], None] | None = None) -> list[Score]:
        """Score every request; `progress(n)` is told of each n requests finished."""
        grouped = by_context(requests)
        contexts = sorted(grouped)  # shared prefixes end up side by side
        results: dict[int, Score] = {}
        for start in range(0, len(contexts), self.batch_size):
            chunk = contexts[start:start + self.batch_size]
            done = self._chunk(chunk, {c: grouped[c] for c in chunk}, requests)
            results.update(done)
            if progress is not None:
                progress(len(done))
        return [results[i] for i in range(len(requests))]

    def _chunk(self, chunk: list[tuple[int, ...]], grouped: dict[tuple[int, ...], list[int]],
               requests: Sequence[Request]) -> dict[int, Score]:
        shared = 0
        if self.share_prefix and len(chunk) > 1:
            shared = min(common_prefix(chunk), min(len(c) for c in chunk) - 1)
        multi = [(row, i) for row, c in enumerate(chunk) for i in grouped[c] if len(requests[i].continuation) > 1]
        prefix_cache = self.prefix.get(chunk[0][:shared]) if shared else None
        cache, attention, last = _contexts_forward(self.model, self.keyword, chunk, shared, prefix_cache, bool(multi))
        best = last.argmax(dim=-1).tolist()
        first: dict[int, tuple[float, bool]] = {}
        for row, c in enumerate(chunk):
            for i in grouped[c]:
                token = requests[i].continuation[0]
                first[i] = (float(last[row, token]), best[row] == token)
        rest: dict[int, tuple[float, bool]] = {}
        for s in range(0, len(multi), self.batch_size):
            part = multi[s:s + self.batch_size]
            scored = _continuations_forward(self.model, self.keyword, cache, attention, [row for row, _ in part],
                                            [len(chunk[row]) for row, _ in part],
                                            [requests[i].continuation for _, i in part])
            rest.update({i: sc for (_, i), sc in zip(part, scored)})
        out = {}
        for i, (lp, greedy) in first.items():
            more_lp, more_greedy = rest.get(i, (0.0, True))
            out[i] = Score(lp + more_lp, greedy and more_greedy, lp)
        return out


def score(model: torch.nn.Module, requests: Sequence[Request], *, batch_size: int = 8,
          share_prefix: bool = True) -> list[Score]:
    """Score requests on `model` (see `Scorer`)."""
    return Scorer(model, batch_size=batch_size, share_prefix=share_prefix).score(requests)


@torch.inference_mode()
def score_reference(model: torch.nn.Module, requests: Sequence[Request]) -> list[Score]:
    """The plain path: one full forward over context + continuation per request, no cache, no padding."""
    device = _device(model)
    out = []
    for r in requests:
        ids = torch.tensor([r.context + r.continuation[:-1]], dtype=torch.long, device=device)
        logprobs = F.log_softmax(model(input_ids=ids).logits[0].float(), dim=-1)[len(r.context) - 1:]
        targets = torch.tensor(r.continuation, dtype=torch.long, device=device)
        token_lp = logprobs.gather(1, targets.unsqueeze(1)).squeeze(1)
        out.append(Score(float(token_lp.sum()), bool((logprobs.argmax(dim=-1) == targets).all()), float(token_lp[0])))
    return out
