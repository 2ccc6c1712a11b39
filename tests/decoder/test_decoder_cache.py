"""Generation with the KV cache computes what the full forward pass computes.

Two prompts of different lengths decode together, greedily: at every step the cached step's logits equal the
last-token logits of a full forward pass over each row's whole sequence so far (1e-5), so their argmax, the
generated tokens, are the same. Sequences run past the sliding windows and through Gemma 2's soft-caps.
(Phi-3's longrope switches to its long factors once a sequence passes the pretraining length; a cache
filled before the switch keeps keys rotated with the short ones, as in transformers, so its test stays
below the switch.)
"""

from __future__ import annotations

import pytest
import torch
from decoder_families import load_pair, run_config, sample_ids

from loratune.decoder import Boundaries
from loratune.decoder.cache import CacheFull

TOL = 1e-5


def _full_last(dec, rows: list[torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        logits = dec(torch.cat(rows), Boundaries.from_lengths([len(r) for r in rows]))
    ends = torch.tensor([len(r) for r in rows]).cumsum(0) - 1
    return logits[ends]


@pytest.mark.parametrize(("name", "prompts", "steps"), [("llama", (6, 3), 8), ("mistral", (6, 3), 8),
                                                        ("gemma2", (6, 3), 8), ("qwen3", (4, 7), 6),
                                                        ("phi3", (5, 2), 3)])
def test_cached_greedy_decoding_equals_full_forward(name, prompts, steps, checkpoint, quiet):
    _, dec = load_pair(run_config(checkpoint(name)))
    rows = sample_ids(prompts, seed=7)
    cache = dec.new_cache(batch=2, capacity=16)
    with torch.no_grad():
        prefill = dec(torch.cat(rows), cache.boundaries(prompts), cache=cache)
    ends = torch.tensor(prompts).cumsum(0) - 1
    step_logits = prefill[ends]
    for _ in range(steps):
        full = _full_last(dec, rows)
        assert (step_logits - full).abs().max().item() < TOL
        nxt = full.argmax(-1)
        assert torch.equal(step_logits.argmax(-1), nxt)
        rows = [torch.cat([r, t[None]]) for r, t in zip(rows, nxt)]
        with torch.no_grad():
            step_logits = dec(nxt[:, None], cache=cache)[:, -1]
    assert cache.lengths == [p + steps for p in prompts]


def test_chunked_prefill_equals_one_prefill(checkpoint, quiet):
    """A prompt fed in two pieces (the second attending to the cached first) gives the one-piece logits."""
    _, dec = load_pair(run_config(checkpoint("gemma3")))
    prompt = sample_ids((11,), seed=2)[0]
    with torch.no_grad():
        whole = dec(prompt)
        cache = dec.new_cache(batch=1, capacity=16)
        first = dec(prompt[:4], cache.boundaries([4]), cache=cache)
        second = dec(prompt[4:], cache.boundaries([7]), cache=cache)
    assert (torch.cat([first, second]) - whole).abs().max().item() < TOL


def test_cache_refuses_overflow_and_stale_boundaries(checkpoint, quiet):
    _, dec = load_pair(run_config(checkpoint("llama")))
    cache = dec.new_cache(batch=1, capacity=4)
    with pytest.raises(CacheFull, match="made for 4"):
        cache.boundaries([5])
    dec(torch.arange(3, 6), cache.boundaries([3]), cache=cache)
    with pytest.raises(ValueError, match="KVCache.boundaries"):
        dec(torch.arange(3, 4), Boundaries.from_lengths([1]), cache=cache)


def test_slots_step_alone_and_a_released_slot_takes_a_new_prompt(checkpoint, quiet):
    """Rows of one cache advance on their own: a step over some slots leaves the others as they were, and an
    emptied slot refilled with another prompt decodes it as a fresh cache would (continuous batching)."""
    from loratune.decoder.generate import SlotDecoder

    _, dec = load_pair(run_config(checkpoint("gemma2")))  # sliding window and soft-caps
    a, b, c = (p.tolist() for p in sample_ids((6, 3, 5), seed=9))
    with torch.no_grad():
        slots = SlotDecoder(dec, 3, 16)
        first = slots.prefill([0, 2], [a, b])  # slot 1 stays empty
        assert slots.cache.lengths == [6, 0, 3]
        want = _full_last(dec, [torch.tensor(a), torch.tensor(b)])
        assert (first - want).abs().max().item() < TOL
        t = first.argmax(-1)
        only_b = slots.step([2], t[1:])  # slot 0 waits
        assert slots.cache.lengths == [6, 0, 4]
        b2 = torch.tensor(b + [int(t[1])])
        assert (only_b - _full_last(dec, [b2])).abs().max().item() < TOL
        late = slots.prefill([1], [c])  # a prompt joins while the others are mid-answer
        assert (late - _full_last(dec, [torch.tensor(c)])).abs().max().item() < TOL
        u = only_b.argmax(-1)
        step = slots.step([1, 0, 2], torch.stack([late.argmax(-1)[0], t[0], u[0]]))
        rows = [torch.tensor(c + [int(late.argmax(-1)[0])]), torch.tensor(a + [int(t[0])]),
                torch.cat([b2, u])]
        assert (step - _full_last(dec, rows)).abs().max().item() < TOL
        slots.release([0])
        assert slots.cache.lengths == [0, 6, 5]
        again = slots.prefill([0], [c])  # the stale keys past its new length are never attended to
        assert (again - _full_last(dec, [torch.tensor(c)])).abs().max().item() < TOL
        with pytest.raises(ValueError, match="not empty"):
            slots.prefill([2], [a])
        with pytest.raises(ValueError, match="distinct slots"):
            slots.cache.boundaries([1, 1], [1, 1])


@pytest.mark.parametrize("name", ["llama", "gemma2", "mistral"])
def test_runs_continuing_several_slots_equal_full_forward(name, checkpoint, quiet):
    """Runs of different lengths continuing slots of different lengths (a subset of the slots, out of order) are
    attended in one masked pass; each token's logits equal the full forward's over its row (windows, soft-caps)."""
    _, dec = load_pair(run_config(checkpoint(name)))
    prompts, runs = (7, 3, 5), (2, 6, 1)
    rows = sample_ids(prompts, seed=3)
    more = sample_ids(runs, seed=4)
    cache = dec.new_cache(batch=3, capacity=16)
    with torch.no_grad():
        dec(torch.cat(rows), cache.boundaries(prompts), cache=cache)
        order = (2, 0, 1)
        got = dec(torch.cat([more[s] for s in order]), cache.boundaries([runs[s] for s in order], order), cache=cache)
        start = 0
        for s in order:
            full = dec(torch.cat([rows[s], more[s]]))
            want = full[prompts[s]:]
            assert (got[start:start + runs[s]] - want).abs().max().item() < TOL
            start += runs[s]
    assert cache.lengths == [p + r for p, r in zip(prompts, runs)]
