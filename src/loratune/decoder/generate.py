"""Greedy decoding with the decoder's KV cache: the tokens a prompt continues with, one forward per token.

What the training run uses for its sample answers (`loratune.train.samples`), on the model it trains. The
rules are those of `loratune.infer.engine.decode_steps` with temperature 0, so that the answer equals
`loratune chat --temperature 0` on the saved adapter: the argmax of the fp32 logits, a stop token ends the
answer (and is returned with it), at most `max_new_tokens` new tokens and never past `max_total` tokens in
all. The prompt is prefilled in one pass; each later step feeds one token and reuses the cache.
"""

from __future__ import annotations

import torch

from loratune.decoder.model import Decoder


@torch.inference_mode()
def greedy(decoder: Decoder, prompt: list[int], max_new_tokens: int, stop_ids: frozenset[int] | set[int],
           max_total: int | None = None) -> list[int]:
    """The greedy continuation of `prompt` (its stop token included when one ended it)."""
    if not prompt:
        raise ValueError("the prompt needs at least one token")
    budget = max_new_tokens if max_total is None else min(max_new_tokens, max_total - len(prompt))
    if budget <= 0:
        return []
    device = decoder.embed.weight.device
    cache = decoder.new_cache(1, len(prompt) + budget)
    ids = torch.tensor(prompt, dtype=torch.long, device=device)
    out: list[int] = []
    while True:
        hidden = decoder.hidden_states(ids, cache.boundaries([ids.numel()]), cache=cache)
        token = int(decoder.logits(hidden[-1:]).float().argmax(dim=-1))
        out.append(token)
        if token in stop_ids or len(out) >= budget:
            return out
        ids = torch.tensor([token], dtype=torch.long, device=device)
