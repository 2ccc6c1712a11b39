"""Inference on loratune's decoder equals inference on transformers, token for token (CPU, fp32, greedy).

The reference is the plainest one: the transformers model, each prompt alone, a full forward pass per new
token, argmax of the last position (`manual_greedy`). The decoder engine decodes the prompts together
(different lengths, one stream, no padding) through its KV cache. Every tiny family the decoder owns
(`loratune.model.tiny.build_tiny_arch` around the tiny Llama tokenizer), adapters switched per request on
one base, NF4 bases; sampling, stop strings, cancellation and `Engine.use` on the decoder.
"""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch
from test_infer_engine import _prompts, _tokens, manual_greedy

from loratune.decoder import Decoder
from loratune.errors import ModelError
from loratune.infer.engine import DecoderStepper, Delta, Finish, decode_steps
from loratune.infer.load import load_engine
from loratune.infer.sampling import SamplingParams

ARCHS = ["llama", "qwen2", "qwen3", "mistral", "gemma2", "gemma3", "phi3"]


@pytest.fixture(scope="module")
def arch_models(tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory):
    from loratune.model.tiny import build_tiny_arch

    root = tmp_path_factory.mktemp("archs")
    return lambda arch: build_tiny_arch(arch, tiny_llama, root / arch, seed=3)


def _steps(engine, name: str, prompts, n: int) -> list[list[int]]:
    """Greedy tokens per row (stop tokens ignored) through the engine's model answering as `name`."""
    with engine.use(name) as model:
        got = list(decode_steps(model, prompts, SamplingParams(max_new_tokens=n), stop_ids=frozenset(),
                                pad_id=engine.format(name).pad_id))
    return [[s[row] for s in got] for row in range(len(prompts))]


@pytest.mark.parametrize("arch", ARCHS)
def test_every_family_decodes_as_transformers(arch_models, arch: str) -> None:
    folder = str(arch_models(arch))
    ours = load_engine([folder], implementation=None)
    ref = load_engine([folder], implementation="transformers")
    assert ours.decoder and isinstance(ours.model, Decoder) and not ref.decoder
    assert ours.why.startswith("model: loratune's decoder")
    prompts = _prompts(ours.format())  # 3 prompts of different lengths, decoded together
    got = _steps(ours, "base", prompts, 10)
    for row, prompt in enumerate(prompts):
        assert got[row] == manual_greedy(ref.model, prompt, 10), (arch, row)
    msgs = [{"role": "user", "content": "Hi there"}]
    p = SamplingParams(max_new_tokens=8)
    assert _tokens(ours.chat(msgs, p)) == _tokens(ref.chat(msgs, p))
    assert ours.context_length == ref.context_length and ours.vocab_size == ref.vocab_size


def test_an_architecture_the_decoder_does_not_own_falls_back_and_says_why(arch_models) -> None:
    folder = str(arch_models("deepseek_v3"))
    eng = load_engine([folder], implementation=None)
    assert not eng.decoder and eng.why.startswith("model: transformers + peft, the fallback:")
    with pytest.raises(ModelError):
        load_engine([folder], implementation="loratune")
    assert _tokens(eng.chat([{"role": "user", "content": "Hi"}], SamplingParams(max_new_tokens=3)))


def test_the_environment_picks_the_model_code_as_in_training(adapter_a: Path, monkeypatch) -> None:
    monkeypatch.setenv("LORATUNE_IMPLEMENTATION", "transformers")
    assert not load_engine([str(adapter_a)], implementation=None).decoder
    monkeypatch.setenv("LORATUNE_IMPLEMENTATION", "loratune")
    assert load_engine([str(adapter_a)], implementation=None).decoder


def test_adapters_on_one_decoder_switch_per_request_as_peft_does(engine, hf_engine) -> None:
    """base, alpha and beta interleaved on one decoder equal the transformers + peft engine's answers."""
    assert engine.decoder and engine.bank is not None
    fmt = engine.format("alpha")
    prompts = _prompts(fmt)
    answers = {}
    for name in ["alpha", "beta", "base", "alpha"]:
        answers.setdefault(name, []).append(_steps(engine, name, prompts, 8))
    assert answers["alpha"][0] == answers["alpha"][1]  # switching away and back changes nothing
    for name, runs in answers.items():
        for row, prompt in enumerate(prompts):
            with hf_engine.use(name) as ref:
                assert runs[0][row] == manual_greedy(ref, prompt, 8), (name, row)
    assert len({tuple(map(tuple, r[0])) for r in answers.values()}) == 3  # the three models differ


@pytest.mark.parametrize("source", ["adapter_4bit", "base_4bit"])
def test_nf4_base_decodes_as_transformers(request, tiny_llama: Path, source: str) -> None:
    if source == "adapter_4bit":
        folder, bits, name = str(request.getfixturevalue("adapter_4bit")), None, None
    else:
        folder, bits, name = str(tiny_llama), 4, None
    ours = load_engine([folder], bits=bits, implementation=None)
    ref = load_engine([folder], bits=bits, implementation="transformers")
    assert ours.decoder and ours.model.layers[0].attn.q_proj.quantized
    prompts = _prompts(ours.format())
    got = _steps(ours, name or ours.default, prompts, 8)
    with ref.use(name or ref.default) as model:
        for row, prompt in enumerate(prompts):
            assert got[row] == manual_greedy(model, prompt, 8), row


def test_seeded_sampling_and_penalties_answer_as_on_transformers(engine, hf_engine) -> None:
    fmt = engine.format("alpha")
    prompt = fmt.render([{"role": "user", "content": "Sample something"}])
    for kw in ({"temperature": 1.0, "seed": 11}, {"temperature": 0.7, "top_p": 0.9, "top_k": 20, "seed": 5},
               {"repetition_penalty": 1.8}):
        p = SamplingParams(max_new_tokens=12, **kw)
        assert _tokens(engine.generate([prompt], p, "alpha")) == _tokens(hf_engine.generate([prompt], p, "alpha"))


def test_stop_strings_streaming_and_cancellation_on_the_decoder(engine, hf_engine) -> None:
    fmt = engine.format("beta")
    prompt = fmt.render([{"role": "user", "content": "Tell me"}])
    free = "".join(e.text for e in engine.generate([prompt], SamplingParams(max_new_tokens=12), "beta",
                                                   ignore_eos=True) if isinstance(e, Delta))
    stop = free[len(free) // 2:len(free) // 2 + 2]
    assert stop.strip(), free
    p = SamplingParams(max_new_tokens=12, stop=(stop,))
    ours = list(engine.generate([prompt], p, "beta", ignore_eos=True))
    assert ours == list(hf_engine.generate([prompt], p, "beta", ignore_eos=True))  # every event, text and finish
    assert ours[-1].reason == "stop" and ours[-1].stop == stop
    assert stop not in "".join(e.text for e in ours if isinstance(e, Delta))
    calls = iter(range(100))
    cut = list(engine.generate([prompt, prompt[:5]], SamplingParams(max_new_tokens=12), "beta",
                               cancel=lambda: next(calls) >= 3, ignore_eos=True))
    finishes = [e for e in cut if isinstance(e, Finish)]
    assert [f.reason for f in finishes] == ["cancelled", "cancelled"]
    assert [f.completion_tokens for f in finishes] == [3, 3]  # cancel() was false before the first 3 forwards


def test_finished_rows_are_not_stepped(engine, monkeypatch) -> None:
    """A row that stopped costs nothing later: the decoder's step only feeds the rows still decoding."""
    fmt = engine.format("alpha")
    prompts = _prompts(fmt)
    free = _steps(engine, "alpha", prompts, 6)
    stop = free[1][1]  # row 1 stops at its second token
    seen: list[list[int]] = []
    real = DecoderStepper.step
    monkeypatch.setattr(DecoderStepper, "step", lambda self, rows, tokens: seen.append(list(rows)) or
                        real(self, rows, tokens))
    with engine.use("alpha") as model:
        got = list(decode_steps(model, prompts, SamplingParams(max_new_tokens=6), stop_ids=frozenset({stop}),
                                pad_id=fmt.pad_id))
    first = free[1].index(stop)
    assert [s[1] for s in got][:first + 1] == free[1][:first + 1]
    assert all(1 not in rows for rows in seen[first:]) and all(1 in rows for rows in seen[:first])
    for row in (0, 2):  # the other rows are unaffected (unless they stop on the same token)
        if stop not in free[row]:
            assert [s[row] for s in got] == free[row]


def test_use_is_thread_safe_and_refuses_a_different_name_inside(engine) -> None:
    fmt = engine.format("alpha")
    prompt = fmt.render([{"role": "user", "content": "Threads"}])
    p = SamplingParams(max_new_tokens=8)
    want = {n: _tokens(engine.generate([prompt], p, n)) for n in ("alpha", "beta", "base")}
    got: dict[str, list[list[int]]] = {n: [] for n in want}

    def worker(name: str) -> None:
        for _ in range(3):
            got[name].append(_tokens(engine.generate([prompt], p, name)))

    threads = [threading.Thread(target=worker, args=(n,)) for n in want]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(runs == [want[n]] * 3 for n, runs in got.items())
    with engine.use("alpha") as model:
        with engine.use("alpha") as again:  # re-entrant for the same name
            assert again is model
        assert _tokens(engine.generate([prompt], p, "alpha")) == want["alpha"]
        with pytest.raises(ModelError, match="one model at a time"):
            with engine.use("beta"):
                pass
    with pytest.raises(ModelError, match="no model named"):
        with engine.use("gamma"):
            pass


def test_batched_prompts_of_different_lengths_fill_the_cache_without_padding(engine) -> None:
    """The prefill is one stream of exactly the prompts' tokens; each slot holds its own prompt + answer."""
    fmt = engine.format("base")
    prompts = _prompts(fmt)
    stepper_box = {}
    real_init = DecoderStepper.__init__

    def spy(self, decoder, rows, capacity):
        real_init(self, decoder, rows, capacity)
        stepper_box["s"] = self

    DecoderStepper.__init__ = spy
    try:
        with engine.use("base") as model:
            list(decode_steps(model, prompts, SamplingParams(max_new_tokens=4), stop_ids=frozenset(),
                              pad_id=fmt.pad_id))
    finally:
        DecoderStepper.__init__ = real_init
    cache = stepper_box["s"].slots.cache
    assert cache.lengths == [len(p) + 3 for p in prompts]  # the 4th token is sampled, never fed back
    assert cache.capacity == max(map(len, prompts)) + 4
    assert torch.count_nonzero(cache.keys[0][1, :, len(prompts[1]) + 3:]) == 0  # nothing past row 1's end


def test_adapters_of_different_ranks_switch_on_one_decoder(tiny_llama: Path, adapter_a: Path, tmp_path) -> None:
    from run_folder import make_adapter_dir

    small = make_adapter_dir(tiny_llama, tmp_path / "r2", seed=12, rank=2)
    sources = [f"big={adapter_a}", f"small={small}"]
    ours, ref = load_engine(sources, implementation=None), load_engine(sources, implementation="transformers")
    layer = ours.model.layers[0].attn.q_proj
    prompts = _prompts(ours.format("big"))
    for name, rank in (("small", 2), ("big", 8), ("base", 0)):
        got = _steps(ours, name, prompts, 6)
        assert layer.rank == rank
        with ref.use(name) as model:
            assert got == [manual_greedy(model, p, 6) for p in prompts], name
