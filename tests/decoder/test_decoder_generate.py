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


def _hf_greedy(hf, prompt: list[int], n: int) -> list[int]:
    """transformers' model, the prompt alone, a full forward pass per new token (no cache)."""
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            seq.append(int(hf(input_ids=torch.tensor([seq])).logits[0, -1].argmax()))
    return seq[len(prompt):]


@pytest.mark.parametrize("name", ["llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3", "gemma3mm",
                                  "phi3"])
def test_engine_decoding_on_the_decoder_equals_transformers(name, checkpoint, quiet):
    """The engine's loop on the decoder (prompts of different lengths together, one stream, the KV cache's
    batched step past the tiny sliding windows) gives transformers' greedy tokens for each prompt alone.

    Phi-3's longrope switches factors once a sequence passes 8 tokens: a cached generation keeps the keys
    rotated before the switch (transformers' cached loop does the same), which a full forward per token
    would rotate again, so its reference is transformers' own cached loop, each prompt alone."""
    from loratune.infer.engine import decode_steps
    from loratune.infer.sampling import SamplingParams

    hf, dec = load_pair(run_config(checkpoint(name)))
    prompts = [p.tolist() for p in sample_ids((7, 3, 5), seed=4)]
    steps = list(decode_steps(dec, prompts, SamplingParams(max_new_tokens=9), stop_ids=frozenset(), pad_id=0))
    for row, prompt in enumerate(prompts):
        if name == "phi3":
            want = [s[0] for s in decode_steps(hf, [prompt], SamplingParams(max_new_tokens=9),
                                               stop_ids=frozenset(), pad_id=0)]
        else:
            want = _hf_greedy(hf, prompt, 9)
        assert [s[row] for s in steps] == want, (name, row)
