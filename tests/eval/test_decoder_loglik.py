"""Scoring on loratune's decoder (padding-free streams, shared prefixes) equals the plain HF reference."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from loratune.decoder import Decoder, decoder_from_hf
from loratune.eval.decoder_loglik import DecoderScorer
from loratune.eval.loglik import Request, score_reference


def _requests(seed: int, vocab: int = 500) -> list[Request]:
    """Two 'subjects' of questions, each sharing a 30-token preamble, 4 choices of 1-3 tokens; one unrelated."""
    rng = random.Random(seed)
    out = []
    for _ in range(2):
        preamble = tuple(rng.randrange(5, vocab) for _ in range(30))
        for _ in range(5):
            ctx = preamble + tuple(rng.randrange(5, vocab) for _ in range(rng.randrange(1, 9)))
            out += [Request(ctx, tuple(rng.randrange(5, vocab) for _ in range(rng.randrange(1, 4)))) for _ in range(4)]
    out.append(Request((7, 8, 9), (10,)))
    return out


def _pair(folder: Path):
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    ref = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    return decoder_from_hf(model, attention="sdpa"), ref


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma", "mistral"])
def test_decoder_scores_equal_the_hf_reference(family: str, tiny_models: dict[str, Path]) -> None:
    decoder, ref_model = _pair(tiny_models[family])
    requests = _requests(0)
    ref = score_reference(ref_model, requests)
    for share in (True, False):
        for batch_size in (1, 3, 8):
            got = DecoderScorer(decoder, batch_size=batch_size, share_prefix=share).score(requests)
            assert [g.logprob for g in got] == pytest.approx([r.logprob for r in ref], abs=1e-5)
            assert [g.first for g in got] == pytest.approx([r.first for r in ref], abs=1e-5)
            assert [g.greedy for g in got] == [r.greedy for r in ref]


def test_chunks_follow_shared_prefixes(tiny_models: dict[str, Path]) -> None:
    """Each 'subject' is its own chunk (its preamble prefilled once), however the batch size would cut them."""
    decoder, _ = _pair(tiny_models["llama"])
    contexts = sorted({r.context for r in _requests(3)})
    chunks = DecoderScorer(decoder, batch_size=8).chunks(contexts)
    assert sum(len(c) for c in chunks) == len(contexts) and [x for c in chunks for x in c] == contexts
    for chunk in chunks:
        if len(chunk) > 1:
            assert all(c[:30] == chunk[0][:30] for c in chunk)
    assert [len(c) for c in DecoderScorer(decoder, batch_size=8, share_prefix=False).chunks(contexts)] == [8, 3]


def test_a_greedy_continuation_and_training_mode(tiny_models: dict[str, Path]) -> None:
    decoder, ref_model = _pair(tiny_models["qwen2"])
    ctx = tuple(range(20, 40))
    with torch.no_grad():
        a = int(ref_model(torch.tensor([ctx])).logits[0, -1].argmax())
        b = int(ref_model(torch.tensor([ctx + (a,)])).logits[0, -1].argmax())
    decoder.train()
    got = DecoderScorer(decoder, batch_size=2).score([Request(ctx, (a, b)), Request(ctx, (a, (b + 1) % 500))])
    assert [g.greedy for g in got] == [True, False] and got[0].first == got[1].first
    assert decoder.training  # its mode is given back


@pytest.mark.parametrize("bits", [16, 4])
def test_eval_models_score_on_the_decoder_as_on_transformers(bits: int, tiny_llama: Path, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """As `loratune eval` loads them (one engine: two adapters and their base) where the engine answers on
    transformers: each model scores on loratune's decoder over the engine's own tensors, with its adapter, as the
    transformers model does (NF4 base too)."""
    import sys

    from loratune.eval.config import EvalModelConfig
    from loratune.eval.models import load, plan, scoring, selected

    sys.path.insert(0, str(Path(__file__).parent.parent / "infer"))
    from run_folder import make_adapter_dir

    monkeypatch.setenv("LORATUNE_IMPLEMENTATION", "transformers")
    specs = [EvalModelConfig(name="base", path=str(tiny_llama))]
    for seed in (1, 2):
        folder = make_adapter_dir(tiny_llama, tmp_path / f"a{seed}", bits=bits, seed=seed)
        specs.append(EvalModelConfig(name=f"tuned{seed}", path=str(folder)))
    (group,) = plan(specs)
    loaded = load(group)  # on transformers (the environment says so, as a run trained there would)
    assert not isinstance(loaded.engine.model, Decoder)
    requests = _requests(4)
    scores = {}
    for name in ("tuned1", "base", "tuned2", "tuned1"):
        with scoring(loaded, name) as net:
            assert isinstance(net, Decoder)
            got = DecoderScorer(net, batch_size=4).score(requests)
        with selected(loaded.engine, name) as hf:
            ref = score_reference(hf, requests)
        assert [g.logprob for g in got] == pytest.approx([r.logprob for r in ref], abs=1e-4)
        scores.setdefault(name, [g.logprob for g in got])
    assert max(abs(a - b) for a, b in zip(scores["tuned1"], scores["base"])) > 1e-2  # the adapters are in effect
    assert max(abs(a - b) for a, b in zip(scores["tuned1"], scores["tuned2"])) > 1e-2


def test_an_engine_on_the_decoder_scores_as_the_decoder_view(tiny_llama: Path, tmp_path: Path) -> None:
    """An engine that answers on loratune's decoder itself (its adapter bank) is scored as it is, with the same
    numbers as the decoder built over a transformers engine's tensors."""
    import sys

    from loratune.eval.models import Loaded, scoring
    from loratune.infer.load import load_engine

    sys.path.insert(0, str(Path(__file__).parent.parent / "infer"))
    from run_folder import make_adapter_dir

    folder = make_adapter_dir(tiny_llama, tmp_path / "a", seed=3)
    requests = _requests(5)
    got = {}
    for implementation in ("loratune", "transformers"):
        engine = load_engine([f"tuned={folder}"], implementation=implementation)
        loaded = Loaded(engine, {"tuned": "tuned", "base": "base"}, {"tuned": str(folder), "base": None})
        for name in ("tuned", "base"):
            with scoring(loaded, name) as net:
                assert isinstance(net, Decoder)
                assert (net is engine.model) == (implementation == "loratune")
                got[implementation, name] = [s.logprob for s in DecoderScorer(net, batch_size=4).score(requests)]
    for name in ("tuned", "base"):
        assert got["loratune", name] == pytest.approx(got["transformers", name], abs=1e-5)
    assert max(abs(a - b) for a, b in zip(got["loratune", "tuned"], got["loratune", "base"])) > 1e-2


def test_continuations_sharing_their_inputs_run_once_and_score_as_the_reference(tiny_models: dict[str, Path]) -> None:
    """Letter answers whose space is a token of its own (" A" = [space, A]): the four continuations of a context
    share their input, which runs once per context; contexts with several distinct inputs take rounds. Every score
    equals the plain reference's."""
    decoder, ref_model = _pair(tiny_models["llama"])
    rng = random.Random(5)
    preamble = tuple(rng.randrange(5, 500) for _ in range(20))
    requests = []
    for q in range(6):
        ctx = preamble + tuple(rng.randrange(5, 500) for _ in range(3 + q))
        requests += [Request(ctx, (4, letter)) for letter in (11, 12, 13, 14)]  # shared input (4,)
        requests += [Request(ctx, (rng.randrange(5, 500), rng.randrange(5, 500), 9))]  # a second, longer input
    ref = score_reference(ref_model, requests)
    calls = []
    original = decoder.hidden_states

    def counting(ids, boundaries=None, cache=None):
        calls.append(len(boundaries.lengths) if boundaries is not None else 0)
        return original(ids, boundaries, cache=cache)

    decoder.hidden_states = counting  # the test's own instance: count the passes
    got = DecoderScorer(decoder, batch_size=8).score(requests)
    assert [g.logprob for g in got] == pytest.approx([r.logprob for r in ref], abs=1e-5)
    assert [g.greedy for g in got] == [r.greedy for r in ref]
    # prefix, contexts, then two rounds of continuation inputs (one per context each), not one row per request
    assert calls == [1, 6, 6, 6]
