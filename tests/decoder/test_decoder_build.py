"""Building the decoder from a loratune Config and a checkpoint folder: what it holds, what it refuses."""

from __future__ import annotations

import gc
import json
import weakref

import bitsandbytes as bnb
import pytest
import torch
from decoder_families import LENGTHS, hf_logits, load_pair, run_config, sample_ids

from loratune.decoder import Boundaries, build_decoder, decoder_from_hf
from loratune.errors import ConfigError, ModelError
from loratune.model.load import load_base


def test_build_decoder_from_config_and_folder(checkpoint, quiet):
    """The training setup: 4-bit NF4 base, LoRA on every projection, checkpointing on (auto for 4-bit), and
    nothing of transformers' module tree inside."""
    cfg = run_config(checkpoint("qwen2"), "quantization.bits=4")
    dec = build_decoder(cfg, seed=0)
    layers = dec.linear_layers()
    assert len(layers) == 14 and all(isinstance(m.weight, bnb.nn.Params4bit) for m in layers.values())
    assert all(m.rank == 4 and m.scale == 2.0 for m in layers.values())
    assert dec.checkpointing and dec.compute_dtype == torch.float32
    trainable = {n for n, p in dec.named_parameters() if p.requires_grad}
    assert trainable == {f"{n}.lora_{x}" for n in layers for x in "AB"}
    assert not [m for m in dec.modules() if type(m).__module__.startswith(("transformers", "peft"))]
    logits = dec(torch.cat(sample_ids()), Boundaries.from_lengths(LENGTHS))
    logits.square().mean().backward()
    assert all(m.lora_B.grad.abs().max() > 0 for m in layers.values())


def test_the_hf_tree_is_released(checkpoint, quiet):
    """decoder_from_hf keeps the tensors, not the model: once the caller drops it, it is gone."""
    hf = load_base(run_config(checkpoint("llama"), "quantization.bits=4"))
    ref = weakref.ref(hf)
    dec = decoder_from_hf(hf)
    del hf
    gc.collect()
    assert ref() is None
    assert dec(torch.arange(3, 9)).shape == (6, 97)


def test_full_fine_tuning_gradients_match_hf(checkpoint, quiet):
    """adapter.type=none: the dense base weights train, norms included (Gemma's (1 + w) form); gradients of
    every base tensor equal the HF model's (fp32, 1e-5 of each gradient's largest entry)."""
    cfg = run_config(checkpoint("gemma"), "adapter.type=none")
    hf = load_base(cfg).train()
    dec = decoder_from_hf(hf, attention="sdpa", train_base=True).train()
    ids = sample_ids()
    hf_logits(hf, ids).square().mean().backward()
    want = {n: p.grad.clone() for n, p in hf.named_parameters()}
    hf.zero_grad(set_to_none=True)
    dec(torch.cat(ids), Boundaries.from_lengths(LENGTHS)).square().mean().backward()
    got = {n: p.grad for n, p in hf.named_parameters()}  # the same tensors: our backward filled their .grad
    assert set(got) == set(want) and len(want) == 1 + 1 + 2 * (4 + 3 + 2)  # embed, norm, per block
    for n, w in want.items():
        assert (got[n] - w).abs().max().item() <= 1e-5 * w.abs().max().item(), n


def test_refusals_are_named_before_loading(checkpoint, tmp_path, quiet):
    folder = checkpoint("llama")
    with pytest.raises(ModelError, match="bits=8"):
        build_decoder(run_config(folder, "quantization.bits=8"))
    with pytest.raises(ModelError, match="dora"):
        build_decoder(run_config(folder, "adapter.dora=true"))
    gpt2 = tmp_path / "gpt2"  # a config alone: an unsupported family fails before any weight is read
    gpt2.mkdir()
    (gpt2 / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_layer": 1}))
    with pytest.raises(ModelError, match="does not cover model_type 'gpt2'"):
        build_decoder(run_config(gpt2))
    with pytest.raises(ConfigError, match="'flash' needs the flash-attn package"):
        build_decoder(run_config(folder), attention="flash")


def test_a_tensor_the_decoder_would_ignore_is_an_error(checkpoint, quiet):
    hf, _ = load_pair(run_config(checkpoint("mistral")))
    hf.model.layers[0].mlp.register_parameter("extra", torch.nn.Parameter(torch.zeros(3)))
    with pytest.raises(ModelError, match=r"would not use: \['model.layers.0.mlp.extra'\]"):
        decoder_from_hf(hf)


def test_a_deep_copy_computes_with_its_own_weights(checkpoint, quiet):
    """copy.deepcopy gives an independent decoder: changing the copy's base weights leaves the original alone."""
    import copy

    _, dec = load_pair(run_config(checkpoint("llama"), "quantization.bits=4"))
    twin = copy.deepcopy(dec)
    ids = torch.cat(sample_ids())
    with torch.no_grad():
        before = dec(ids)
        assert torch.equal(twin(ids), before)
        twin.layers[0].attn.q_proj.weight.quant_state.absmax.zero_()  # the copy's q_proj now computes zeros
        assert not torch.equal(twin(ids), before)
        assert torch.equal(dec(ids), before)
