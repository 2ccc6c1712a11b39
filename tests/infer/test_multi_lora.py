"""Rows of one batch on different adapters (decoder/multi_lora.py, the batcher's mixed passes, the adapter LRU).

A mixed batch (the base and three adapters of two ranks, tiny Llama, CPU fp32) answers exactly as each request
alone with its adapter on the layers: the same greedy token ids, logits within 1e-5.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from run_folder import make_adapter_dir

from loratune.decoder.generate import SlotDecoder
from loratune.decoder.multi_lora import (LayerAdapters, LoRAPair, PassRows, RowPlan, Stack, reference_segmented_lora,
                                         segmented_lora, stacked_lora)
from loratune.errors import ModelError
from loratune.infer.batcher import Batcher, Submission
from loratune.infer.engine import Delta, Finish
from loratune.infer.sampling import SamplingParams

PROMPTS = ["Tell me a story", "Hi", "What is LoRA and why does it help?", "Count to ten"]


@pytest.fixture(scope="module")
def adapter_c(tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A third adapter, of another rank (4) than alpha and beta (8)."""
    return make_adapter_dir(tiny_llama, tmp_path_factory.mktemp("runs") / "gamma", seed=5, rank=4)


@pytest.fixture(scope="module")
def mixed_engine(adapter_a: Path, adapter_b: Path, adapter_c: Path):
    """Its own engine (these tests load and drop adapters): base, alpha, beta, gamma on the decoder."""
    from loratune.infer.load import load_engine

    return load_engine([str(adapter_a), str(adapter_b), str(adapter_c)], implementation=None)


def test_segmented_lora_equals_the_per_token_reference() -> None:
    g = torch.Generator().manual_seed(0)
    n, d_in, d_out = 11, 16, 12
    x, y = torch.randn(n, d_in, generator=g), torch.randn(n, d_out, generator=g)
    pairs = {"a": LoRAPair.of(torch.randn(4, d_in, generator=g), torch.randn(d_out, 4, generator=g), 0.5,
                              torch.float32),
             "b": LoRAPair.of(torch.randn(8, d_in, generator=g), torch.randn(d_out, 8, generator=g), 2.0,
                              torch.float32)}
    # rows of 3, 2, 4, 2 tokens on a, base, b, c (c: an adapter that leaves this layer out)
    keys, lengths = ["a", None, "b", "c"], [3, 2, 4, 2]
    token_keys = [k for k, m in zip(keys, lengths) for _ in range(m)]
    rows = RowPlan.from_rows(keys, lengths, "cpu")
    groups = rows.groups
    assert [k for k, _ in groups] == ["a", "b", "c"]
    assert groups[0][1].tolist() == [0, 1, 2] and groups[1][1].tolist() == [5, 6, 7, 8]
    got = segmented_lora(y.clone(), x, pairs, groups)
    want = reference_segmented_lora(y, x, pairs, token_keys)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert torch.equal(got[3:5], y[3:5]) and torch.equal(got[9:], y[9:])  # base rows, and c's, untouched
    assert (got[:3] - y[:3]).abs().max() > 0.1  # a's rows changed
    # one adapter for every token: one group without an index (no gather), the same numbers
    whole = RowPlan.from_rows(["b", "b"], [5, 6], "cpu").groups
    assert len(whole) == 1 and whole[0][1] is None
    torch.testing.assert_close(segmented_lora(y.clone(), x, pairs, whole),
                               reference_segmented_lora(y, x, pairs, ["b"] * n), rtol=1e-5, atol=1e-5)
    # stacked: both adapters side by side, a mask per token; c (not on this layer) and base rows masked out
    plan = RowPlan()
    stack = Stack.of(pairs)
    assert stack.layout == (("a", 4), ("b", 8)) and stack.a.shape == (12, d_in) and stack.b.shape == (d_out, 12)
    with plan.rows(rows):
        mask = plan.mask(stack.layout, torch.float32)
        assert plan.mask(stack.layout, torch.float32) is mask  # once per pass and layout
    assert mask[:3].tolist() == [[1.0] * 4 + [0.0] * 8] * 3 and mask[5:9].tolist() == [[0.0] * 4 + [1.0] * 8] * 4
    assert not mask[3:5].any() and not mask[9:].any()
    torch.testing.assert_close(stacked_lora(y.clone(), x, stack, mask), want, rtol=1e-5, atol=1e-5)


def test_masks_are_kept_and_rewritten_when_a_pass_starts_and_padding_repeats_the_first_row() -> None:
    """What a captured decode step relies on: the mask of a token count stays one buffer, rewritten in place as
    each pass starts (a replay runs no Python to ask for it); padded rows use the first row's adapter."""
    layout = (("a", 2), ("b", 3))
    plan = RowPlan()
    with plan.rows(PassRows.of(["a", "b", None], [1, 1, 1], "cpu")):
        mask = plan.mask(layout, torch.float32)
    assert mask.tolist() == [[1, 1, 0, 0, 0], [0, 0, 1, 1, 1], [0, 0, 0, 0, 0]]
    with plan.rows(PassRows.of([None, "a", "a"], [1, 1, 1], "cpu")):
        assert mask.tolist() == [[0, 0, 0, 0, 0], [1, 1, 0, 0, 0], [1, 1, 0, 0, 0]]  # before any layer asks
        assert plan.mask(layout, torch.float32) is mask
    padded = PassRows.of(["b", None, "a"], [1, 1, 1], "cpu").padded(4)
    assert padded.token_keys == ("b", None, "a", "b") and [k for k, _ in padded.groups] == ["b", "a"]
    assert padded.groups[0][1].tolist() == [0, 3]
    pairs = LoRAPair.of(torch.ones(2, 4), torch.ones(3, 2), 1.0, torch.float32)
    version = plan.version
    layer = LayerAdapters(plan)
    layer.put("a", pairs)
    layer.drop("a")
    assert plan.version == version + 2  # a captured mixed step over the old stack is stale


def _alone_logits(engine, key: str | None, prompt: list[int], tokens: list[int]) -> torch.Tensor:
    """Logits of the prompt's last token, then after each of `tokens`, with adapter `key` on the layers."""
    with engine.serving({key}) as model, torch.inference_mode():
        sd = SlotDecoder(model, 1, 64)
        out = [sd.prefill([0], [prompt])[0]]
        for t in tokens:
            out.append(sd.step([0], torch.tensor([t]))[0])
    return torch.stack(out)


@pytest.mark.parametrize("stacked_tokens", [0, 1000], ids=["grouped", "stacked"])
def test_mixed_rows_give_the_logits_of_each_adapter_alone(mixed_engine, stacked_tokens: int) -> None:
    engine = mixed_engine
    engine.bank.plan.stacked_tokens = stacked_tokens  # every pass grouped, or every pass stacked
    names = ["base", "alpha", "beta", "gamma"]
    keys = [engine.key_of(n) for n in names]
    fmt = engine.format("base")
    prompts = [fmt.encode(p) for p in PROMPTS]
    # the tokens each row is fed after its prompt: its own greedy answer alone
    steps = 5
    alone = []
    for key, p in zip(keys, prompts):
        logits = _alone_logits(engine, key, p, [])
        seq = [int(logits[0].argmax())]
        for _ in range(steps - 1):
            seq.append(int(_alone_logits(engine, key, p, seq)[-1].argmax()))
        alone.append((seq, _alone_logits(engine, key, p, seq[:-1])))
    with engine.serving(set(keys)) as model, torch.inference_mode():
        sd = SlotDecoder(model, 4, 64)
        with engine.bank.plan.rows(RowPlan.from_rows(keys, [len(p) for p in prompts], sd.device)):
            mixed = [sd.prefill(range(4), prompts)]
        for i in range(steps - 1):
            with engine.bank.plan.rows(RowPlan.from_rows(keys, [1] * 4, sd.device)):
                mixed.append(sd.step([0, 1, 2, 3], torch.tensor([seq[i] for seq, _ in alone])))
    mixed_t = torch.stack(mixed, dim=1)  # [rows, steps, V]
    for row, (seq, logits) in enumerate(alone):
        torch.testing.assert_close(mixed_t[row], logits, rtol=0, atol=1e-5)
        assert mixed_t[row].argmax(-1).tolist() == seq
    # the adapters really differ: each row's logits are far from the base row's answer to the same prompt
    base_of_alpha = _alone_logits(engine, None, prompts[1], [])
    assert (base_of_alpha[0] - alone[1][1][0]).abs().max() > 1e-2
    engine.bank.plan.stacked_tokens = 64


def _run(batcher: Batcher, subs: list[Submission]) -> int:
    for sub in subs:
        assert batcher.fits(sub)
        batcher.admit(sub)
    steps = 0
    while not batcher.empty:
        batcher.step()
        steps += 1
    return steps


def _submission(engine, name: str, prompt: str, n: int, out: dict) -> Submission:
    tokens, finish = out.setdefault(name + prompt, ([], []))

    def emit(e: Delta | Finish) -> None:
        if isinstance(e, Delta) and e.token_id is not None:
            tokens.append(e.token_id)
        elif isinstance(e, Finish):
            finish.append(e)

    return Submission([engine.format(name).encode(prompt)], SamplingParams(max_new_tokens=n), name, emit,
                      ignore_eos=True)


def _alone_ids(engine, name: str, prompt: str, n: int) -> list[int]:
    events = engine.generate([engine.format(name).encode(prompt)], SamplingParams(max_new_tokens=n), name,
                             ignore_eos=True)
    return [e.token_id for e in events if isinstance(e, Delta) and e.token_id is not None]


def test_a_batch_mixing_the_base_and_three_adapters_answers_as_each_alone(mixed_engine) -> None:
    engine = mixed_engine
    jobs = [("base", PROMPTS[0], 9), ("alpha", PROMPTS[1], 12), ("beta", PROMPTS[2], 7), ("gamma", PROMPTS[3], 10),
            ("alpha", PROMPTS[3], 6)]
    batcher = Batcher(engine, slots=5, capacity=64)
    out: dict = {}
    _run(batcher, [_submission(engine, *job, out) for job in jobs])
    assert batcher.mixed_passes > 0
    for name, prompt, n in jobs:
        tokens, finish = out[name + prompt]
        assert tokens == _alone_ids(engine, name, prompt, n), name
        assert len(tokens) == n and finish[0].completion_tokens == n
    assert not engine.bank.pins  # every request let its adapter go


def test_lru_keeps_at_most_n_adapters_and_reloads_a_dropped_one(mixed_engine, adapter_c: Path) -> None:
    engine = mixed_engine
    bank = engine.bank
    want = {name: _alone_ids(engine, name, PROMPTS[2], 6) for name in ("alpha", "beta", "gamma")}
    loads = bank.loads
    for name in ("alpha", "beta", "gamma"):  # used in this order: alpha the least recently
        bank.ensure(engine.key_of(name))
    bank.limit(2)
    try:
        assert len(bank.resident) == 2 and engine.key_of("alpha") not in bank.resident
        # alpha read again from its folder when asked for; the answer is the same
        assert _alone_ids(engine, "alpha", PROMPTS[2], 6) == want["alpha"]
        assert bank.loads > loads and engine.key_of("beta") not in bank.resident
        # a held adapter is never dropped: with both resident ones held, a third has no room and waits
        a, g = engine.hold("alpha"), engine.hold("gamma")
        assert not engine.has_room("beta") and engine.has_room("base")
        batcher = Batcher(engine, slots=4, capacity=64)
        sub = _submission(engine, "beta", PROMPTS[0], 3, {})
        assert not batcher.fits(sub)
        engine.release(g)
        assert batcher.fits(sub)
        engine.release(a)
        out: dict = {}
        _run(batcher, [_submission(engine, n, PROMPTS[2], 6, out) for n in ("alpha", "beta", "base")])
        assert out["alpha" + PROMPTS[2]][0] == want["alpha"] and out["beta" + PROMPTS[2]][0] == want["beta"]
    finally:
        bank.limit(None)


def test_adapters_added_and_removed_at_run_time(mixed_engine, adapter_c: Path, tmp_path: Path) -> None:
    engine = mixed_engine
    engine.add_adapter("gamma2", adapter_c)
    assert "gamma2" in engine.names
    assert _alone_ids(engine, "gamma2", PROMPTS[0], 5) == _alone_ids(engine, "gamma", PROMPTS[0], 5)
    with pytest.raises(ModelError, match="already served"):
        engine.add_adapter("gamma2", adapter_c)
    # a request running with it keeps it until it ends, though it is removed meanwhile
    batcher = Batcher(engine, slots=2, capacity=64)
    out: dict = {}
    batcher.admit(_submission(engine, "gamma2", PROMPTS[1], 4, out))
    batcher.step()
    key = engine.key_of("gamma2")
    engine.remove_adapter("gamma2")
    assert "gamma2" not in engine.names and key in engine.bank.resident
    while not batcher.empty:
        batcher.step()
    assert out["gamma2" + PROMPTS[1]][0] == _alone_ids(engine, "gamma", PROMPTS[1], 4)
    assert key not in engine.bank.resident and key not in engine.bank
    with pytest.raises(ModelError, match="no model named 'gamma2'"):
        engine.hold("gamma2")
    with pytest.raises(ModelError, match="base model"):
        engine.remove_adapter("base")
