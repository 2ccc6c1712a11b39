"""`greedy`: the decoder's KV-cache decoding with the rules of the generation engine at temperature 0 (the argmax
of each step, a stop token ends the answer and is returned, at most max_new_tokens, never past max_total)."""

from __future__ import annotations

import pytest
import torch
from decoder_families import load_pair, run_config, sample_ids

from loratune.decoder import Boundaries, greedy


def _uncached(dec, prompt: list[int], n: int) -> list[int]:
    """The plain greedy loop: a full forward pass over the whole sequence for every new token."""
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            logits = dec(torch.tensor(seq), Boundaries.from_lengths([len(seq)]))
            seq.append(int(logits[-1].argmax()))
    return seq[len(prompt):]


@pytest.mark.parametrize("name", ["llama", "mistral", "gemma2"])
def test_greedy_equals_the_uncached_loop_and_stops_as_the_engine_does(name, checkpoint, quiet):
    _, dec = load_pair(run_config(checkpoint(name)))
    prompt = sample_ids((6,), seed=5)[0].tolist()
    want = _uncached(dec, prompt, 10)  # past the tiny sliding windows
    assert greedy(dec, prompt, 10, stop_ids=set()) == want
    stop = want[3]
    first = want.index(stop)
    assert greedy(dec, prompt, 10, stop_ids={stop}) == want[:first + 1]  # the stop token ends it, included
    assert greedy(dec, prompt, 10, stop_ids=set(), max_total=len(prompt) + 4) == want[:4]
    assert greedy(dec, prompt, 10, stop_ids=set(), max_total=len(prompt)) == []
    with pytest.raises(ValueError, match="at least one token"):
        greedy(dec, [], 3, stop_ids=set())
