"""Log-likelihoods of continuations on loratune's decoder: padding-free streams, shared prefixes prefilled once.

The same workload as `loratune.eval.loglik` (many (context, continuation) pairs, contexts repeated once per
choice and sharing the few-shot examples of their subject), on `loratune.decoder.Decoder`, whose batches are
token streams with sample boundaries instead of padded rows:

    sorted unique contexts, in chunks of at most `batch_size` that share a token prefix (the shots)
      ├─ prefix  : one forward over the chunk's common prefix into a one-row KV cache     (once per prefix,
      │            kept while consecutive chunks share it)
      ├─ contexts: the cache's row copied to one row per context (a copy, no compute); each context's own
      │            tokens after the prefix laid end to end in one stream into those rows, no padding; the head
      │            runs only on each context's last token, whose log-probs give every continuation's first token
      └─ continuations longer than one token: their tokens but the last, after their context's row, in place
                   (one stream over the rows; continuations of one context that share those tokens, as " A" and
                   " B" do when the space is a token of its own, run once), the rows rewound to the context after
                   each round; a context with several distinct continuations takes one per round

Exact: a token's keys and values depend only on the tokens before it, and positions continue each row's
cache, so every log-probability is the one of a full forward over context + continuation. Log-probs are
taken in float32. `loratune.eval.loglik.score_reference` is the plain path the tests compare with.
A chunk closes where adding a context would cut its shared prefix below half (a new subject's shots begin); a
chunk whose shared prefix extends the cached one by less than its own length reuses the cached one.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from loratune.decoder.cache import KVCache
from loratune.decoder.model import Decoder
from loratune.eval.loglik import Request, Score, by_context, common_prefix


def _rows_of(decoder: Decoder, source: KVCache, rows: Sequence[int], length: int | Sequence[int],
             capacity: int) -> KVCache:
    """A new cache of `len(rows)` rows of `capacity`, row i holding the first `length` tokens of `source`'s row
    `rows[i]` (a copy of those keys and values, nothing recomputed)."""
    lengths = [length] * len(rows) if isinstance(length, int) else list(length)
    out = decoder.new_cache(len(rows), capacity)
    index = torch.tensor(list(rows), dtype=torch.long, device=source.keys[0].device)
    width = max(lengths)
    for mine, theirs in ((out.keys, source.keys), (out.values, source.values)):
        for dst, src in zip(mine, theirs):
            dst[:, :, :width] = src[:, :, :width].index_select(0, index)
    out.lengths = lengths  # tokens past a row's length are never attended to
    return out


class DecoderScorer:
    """Scores batches of requests on a decoder, keeping the last shared prefix's cache between calls (the next
    block of questions of the same subject reuses its shots). Same interface as `loglik.Scorer`."""

    def __init__(self, decoder: Decoder, *, batch_size: int = 8, share_prefix: bool = True) -> None:
        self.decoder, self.batch_size, self.share_prefix = decoder, max(1, batch_size), share_prefix
        self.device = decoder.device
        self._prefix: tuple[tuple[int, ...], KVCache | None] = ((), None)

    def _tensor(self, tokens: Sequence[int]) -> torch.Tensor:
        return torch.tensor(list(tokens), dtype=torch.long, device=self.device)

    def _prefix_cache(self, tokens: tuple[int, ...]) -> KVCache:
        if self._prefix[0] != tokens or self._prefix[1] is None:
            cache = self.decoder.new_cache(1, len(tokens))
            self.decoder.hidden_states(self._tensor(tokens), cache.boundaries([len(tokens)]), cache=cache)
            self._prefix = (tokens, cache)
        return self._prefix[1]  # type: ignore[return-value]

    def chunks(self, contexts: list[tuple[int, ...]]) -> list[list[tuple[int, ...]]]:
        """Consecutive sorted contexts, at most `batch_size` a chunk, a chunk closed where its shared prefix would
        fall below half of what it is."""
        out: list[list[tuple[int, ...]]] = []
        shared = 0
        for k, c in enumerate(contexts):
            if out and len(out[-1]) < self.batch_size:
                now = min(shared, common_prefix([out[-1][0], c]))
                # a chunk of one has no shared prefix yet: c joins it unless c shares much more with the next
                ahead = common_prefix([c, contexts[k + 1]]) if k + 1 < len(contexts) else 0
                if not self.share_prefix or 2 * now >= (shared if len(out[-1]) > 1 else ahead):
                    out[-1].append(c)
                    shared = now
                    continue
            out.append([c])
            shared = len(c) - 1
        return out

    @torch.inference_mode()
    def score(self, requests: Sequence[Request], progress: Callable[[int], None] | None = None) -> list[Score]:
        """Score every request; `progress(n)` is told of each n requests finished."""
        grouped = by_context(requests)
        results: dict[int, Score] = {}
        was_training = self.decoder.training
        self.decoder.eval()
        try:
            for chunk in self.chunks(sorted(grouped)):
                done = self._chunk(chunk, grouped, requests)
                results.update(done)
                if progress is not None:
                    progress(len(done))
        finally:
            self.decoder.train(was_training)
        return [results[i] for i in range(len(requests))]

    def _chunk(self, chunk: list[tuple[int, ...]], grouped: dict[tuple[int, ...], list[int]],
               requests: Sequence[Request]) -> dict[int, Score]:
        dec = self.decoder
        shared = 0
        if self.share_prefix:
            shared = min(common_prefix(chunk), min(len(c) for c in chunk) - 1)
            kept = self._prefix[0]
            if 2 * len(kept) >= shared and len(kept) <= shared and chunk[0][:len(kept)] == kept:
                shared = len(kept)  # the cached prefix (the subject's shots) serves: no new prefill for a few tokens
        multi = [(row, i) for row, c in enumerate(chunk) for i in grouped[c] if len(requests[i].continuation) > 1]
        rest = [c[shared:] for c in chunk]
        lengths = [len(r) for r in rest]
        ids = self._tensor([t for r in rest for t in r])
        # always through a KV cache, even with nothing shared: its attention needs no compilation per stream length
        # (the training decoder's compiled FlexAttention would), and the rows are kept for longer continuations
        capacity = max(len(c) + max((len(requests[i].continuation) - 1 for i in grouped[c]), default=0)
                       for c in chunk)
        cache = (_rows_of(dec, self._prefix_cache(chunk[0][:shared]), [0] * len(chunk), shared, capacity)
                 if shared else dec.new_cache(len(chunk), capacity))
        hidden = dec.hidden_states(ids, cache.boundaries(lengths), cache=cache)
        ends = torch.tensor(lengths, device=self.device).cumsum(0) - 1
        last = F.log_softmax(dec.logits(hidden[ends]).float(), dim=-1)
        best = last.argmax(dim=-1).tolist()
        asked = [(row, i) for row, c in enumerate(chunk) for i in grouped[c]]
        firsts = last[self._tensor([row for row, _ in asked]),
                      self._tensor([requests[i].continuation[0] for _, i in asked])].tolist()  # one read back
        out: dict[int, Score] = {}
        for (row, i), lp in zip(asked, firsts):
            out[i] = Score(lp, best[row] == requests[i].continuation[0], lp)
        for i, (lp, greedy) in self._continuations(cache, chunk, multi, requests).items():
            first = out[i]
            out[i] = Score(first.logprob + lp, first.greedy and greedy, first.first)
        return out

    def _continuations(self, cache: KVCache, chunk: list[tuple[int, ...]], multi: list[tuple[int, int]],
                       requests: Sequence[Request]) -> dict[int, tuple[float, bool]]:
        """{request: (sum of log-probs, greedy)} of tokens 2.. of each continuation, after its context's row.

        The inputs (a continuation but its last token) are run once per (row, inputs), in place on the rows,
        which are rewound to their contexts after each round."""
        dec = self.decoder
        groups: dict[tuple[int, tuple[int, ...]], list[int]] = {}
        for row, i in multi:
            groups.setdefault((row, tuple(requests[i].continuation[:-1])), []).append(i)
        pending = list(groups.items())
        out: dict[int, tuple[float, bool]] = {}
        while pending:
            taken: set[int] = set()
            now, later = [], []
            for item in pending:
                (row, _), _ = item
                (later if row in taken else now).append(item)
                taken.add(row)
            pending = later
            slots = [row for (row, _), _ in now]
            inputs = [x for (_, x), _ in now]
            hidden = dec.hidden_states(self._tensor([t for x in inputs for t in x]),
                                       cache.boundaries([len(x) for x in inputs], slots), cache=cache)
            logprobs = F.log_softmax(dec.logits(hidden).float(), dim=-1)
            cache.rewind(slots, [len(chunk[row]) for row in slots])
            where, tokens, owners = [], [], []  # every (stream position, target token) asked, read back at once
            start = 0
            for (_, x), members in now:
                for i in members:
                    for j, t in enumerate(requests[i].continuation[1:]):
                        where.append(start + j)
                        tokens.append(t)
                        owners.append(i)
                start += len(x)
            at, want = self._tensor(where), self._tensor(tokens)
            lps = logprobs[at, want].tolist()
            hits = (logprobs.argmax(dim=-1)[at] == want).tolist()
            for i, lp, hit in zip(owners, lps, hits):
                total, greedy = out.get(i, (0.0, True))
                out[i] = (total + lp, greedy and hit)
        return out
