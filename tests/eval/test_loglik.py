"""The batched, prefix-sharing log-likelihood path equals the plain one-forward-per-request reference."""

from __future__ import annotations

import random
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from loratune.eval.loglik import Request, Scorer, score, score_reference, truncate

sys.path.insert(0, str(Path(__file__).parent.parent / "infer"))
from run_folder import make_adapter_dir  # noqa: E402


def _requests(seed: int, vocab: int = 500) -> list[Request]:
    """Questions sharing a 30-token preamble, 4 choices of 1-3 tokens each, and one unrelated context."""
    rng = random.Random(seed)
    preamble = tuple(rng.randrange(5, vocab) for _ in range(30))
    out = []
    for _ in range(7):
        ctx = preamble + tuple(rng.randrange(5, vocab) for _ in range(rng.randrange(1, 9)))
        out += [Request(ctx, tuple(rng.randrange(5, vocab) for _ in range(rng.randrange(1, 4)))) for _ in range(4)]
    out.append(Request((7, 8, 9), (10,)))
    return out


def _assert_same(got, ref, tol: float = 1e-5) -> None:
    assert [g.logprob for g in got] == pytest.approx([r.logprob for r in ref], abs=tol)
    assert [g.first for g in got] == pytest.approx([r.first for r in ref], abs=tol)
    assert [g.greedy for g in got] == [r.greedy for r in ref]


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma", "mistral"])
def test_shared_prefix_batches_equal_the_reference(family: str, tiny_models: dict[str, Path]) -> None:
    model = AutoModelForCausalLM.from_pretrained(tiny_models[family], dtype=torch.float32).eval()
    requests = _requests(0)
    ref = score_reference(model, requests)
    assert all(r.logprob < r.first <= 0 or len(q.continuation) == 1 for r, q in zip(ref, requests))
    for share in (True, False):
        for batch_size in (1, 3, 8):
            _assert_same(score(model, requests, batch_size=batch_size, share_prefix=share), ref)


def test_a_greedy_continuation_is_detected(tiny_models: dict[str, Path]) -> None:
    model = AutoModelForCausalLM.from_pretrained(tiny_models["llama"], dtype=torch.float32).eval()
    ctx = tuple(range(20, 40))
    with torch.no_grad():  # the model's own argmax continuation, two tokens
        a = int(model(torch.tensor([ctx])).logits[0, -1].argmax())
        b = int(model(torch.tensor([ctx + (a,)])).logits[0, -1].argmax())
    got = score(model, [Request(ctx, (a, b)), Request(ctx, (a, (b + 1) % 500))], batch_size=2)
    assert [g.greedy for g in got] == [True, False]
    assert got[0].first == got[1].first


def test_the_prefix_cache_is_reused_across_calls_without_changing_results(tiny_models: dict[str, Path]) -> None:
    model = AutoModelForCausalLM.from_pretrained(tiny_models["qwen2"], dtype=torch.float32).eval()
    scorer = Scorer(model, batch_size=4)
    requests = _requests(1)
    first = scorer.score(requests[:12])
    kept = scorer.prefix.tokens
    assert len(kept) >= 30  # the preamble (and possibly more) was cached
    second = scorer.score(requests[12:24])
    _assert_same(first + second, score_reference(model, requests[:24]))


def test_adapters_and_4bit_base(tiny_llama: Path, tmp_path: Path) -> None:
    """Through the engine, as `loratune eval` runs: an adapter on an fp32 base, and one on a 4-bit NF4 base."""
    from loratune.eval.models import selected
    from loratune.infer.load import load_engine

    requests = _requests(2)
    for bits in (16, 4):
        folder = make_adapter_dir(tiny_llama, tmp_path / f"a{bits}", bits=bits, seed=bits)
        engine = load_engine([f"tuned={folder}"], implementation="transformers")
        with selected(engine, "tuned") as net:
            tuned = score(net, requests, batch_size=4)
            _assert_same(tuned, score_reference(net, requests), tol=1e-4)
        with selected(engine, "base") as net:
            base = score(net, requests, batch_size=4)
        assert max(abs(a.logprob - b.logprob) for a, b in zip(tuned, base)) > 1e-2  # the adapter is in effect


def test_truncation_follows_lm_eval() -> None:
    req = Request(tuple(range(10)), (10, 11, 12))
    assert truncate(req, 20) == (req, False)
    cut, was_cut = truncate(req, 8)  # (context + continuation)[-(8 + 1):]
    assert was_cut and cut.context + cut.continuation == tuple(range(13))[-9:] and cut.continuation == (10, 11, 12)
    with pytest.raises(ValueError):
        truncate(Request((1,), tuple(range(9))), 8)
