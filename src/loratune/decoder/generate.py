"""Generation on the decoder: a step function over slots of a preallocated KV cache, and greedy decoding on it.

`SlotDecoder` is what the generation engine (`loratune.infer.engine`) drives when the model is loratune's
decoder. It owns a `KVCache` of `slots` rows and answers two questions, each with the logits of the last
token of every row it was given (the only logits generation needs; the output head runs on nothing else):

    prefill(slots, prompts)   the prompts laid end to end in one stream (no padding), written to their slots
    step(slots, tokens)       one new token for each of these slots (the rows still decoding; finished rows
                              cost nothing), attending to each slot's cache

A slot is emptied with `release` and can take a new prompt while others decode (continuous batching).
The decode step is `loratune.decoder.decode_graphs.DecodeRunner`'s: padded to a batch bucket, positions on
the device, replayed from one CUDA graph per bucket on CUDA (`graphs`: None = there), run eagerly elsewhere.

`greedy` follows the rules of `loratune.infer.engine.decode_steps` with temperature 0 for one prompt.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from loratune.decoder.cache import KVCache
from loratune.decoder.decode_graphs import DecodeRunner
from loratune.decoder.model import Decoder


class SlotDecoder:
    """A decoder and its per-slot KV cache (`slots` rows of `capacity` tokens)."""

    def __init__(self, decoder: Decoder, slots: int, capacity: int, graphs: bool | None = None) -> None:
        self.decoder = decoder
        self.device = decoder.device
        self.cache: KVCache = decoder.new_cache(slots, capacity)
        self.runner = DecodeRunner(decoder, self.cache, graphs)

    def _last_logits(self, ids: Tensor, lengths: Sequence[int], slots: Sequence[int]) -> Tensor:
        b = self.cache.boundaries(lengths, slots)
        hidden = self.decoder.hidden_states(ids, b, cache=self.cache)
        ends = b.cu_seqlens[1:].long() - 1
        return self.decoder.logits(hidden[ends])

    def prefill(self, slots: Sequence[int], prompts: Sequence[Sequence[int]]) -> Tensor:
        """Write the prompts into their (empty) slots; logits [len(slots), V] of each prompt's last token."""
        if any(self.cache.lengths[s] for s in slots):
            raise ValueError(f"slots {[s for s in slots if self.cache.lengths[s]]} are not empty")
        ids = torch.tensor([t for p in prompts for t in p], dtype=torch.long, device=self.device)
        return self._last_logits(ids, [len(p) for p in prompts], slots)

    def step(self, slots: Sequence[int], tokens: Tensor) -> Tensor:
        """One new token per slot ([len(slots)] ids, on any device); logits [len(slots), V]."""
        return self.runner.step(slots, tokens)

    def release(self, slots: Sequence[int]) -> None:
        self.cache.release(slots)


@torch.inference_mode()
def greedy(decoder: Decoder, prompt: list[int], max_new_tokens: int, stop_ids: frozenset[int] | set[int],
           max_total: int | None = None) -> list[int]:
    """The greedy continuation of `prompt` (its stop token included when one ended it): the argmax of the fp32
    logits each step, at most `max_new_tokens` new tokens, never past `max_total` tokens in all."""
    if not prompt:
        raise ValueError("the prompt needs at least one token")
    budget = max_new_tokens if max_total is None else min(max_new_tokens, max_total - len(prompt))
    if budget <= 0:
        return []
    slots = SlotDecoder(decoder, 1, len(prompt) + budget)
    logits = slots.prefill([0], [prompt])
    out: list[int] = []
    while True:
        token = int(logits[0].float().argmax())
        out.append(token)
        if token in stop_ids or len(out) >= budget:
            return out
        logits = slots.step([0], torch.tensor([token]))
