"""`model.rope_scaling` (linear, dynamic NTK, YaRN, llama3): the config it writes, the decoder's cos/sin against
transformers' rotary embedding, and logits of the decoder against the HF model with each scaling.

cos/sin: fp32, 1e-6, on a Llama-3-like head (128 dims, theta 500000, pretrained on 4096) at positions up to
three times the pretraining length, where every scaling differs from plain RoPE. Logits: the tiny Llama of
`decoder_families` with its pretraining length set to 16 tokens, samples of 7, 40, 3 and 20 tokens, each run
alone through the HF model (for dynamic NTK, in an order for which transformers' stateful frequencies are
those of each sample alone: see loratune.decoder.rope).
"""

from __future__ import annotations

import math

import pytest
import torch
from decoder_families import SHAPE, hf_logits, load_pair, run_config, sample_ids
from transformers import AutoConfig, AutoModelForCausalLM
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

from loratune.config import RopeScalingConfig, load_config
from loratune.decoder import Boundaries
from loratune.decoder.config import decoder_config
from loratune.decoder.rope import Rotary
from loratune.errors import ConfigError, ModelError
from loratune.model.rope_scaling import apply_rope_scaling, context_length

KINDS = ["linear", "dynamic", "yarn", "llama3"]
LENGTHS = (7, 40, 3, 20)


def _llama_config(**extra):
    return AutoConfig.for_model("llama", hidden_size=1024, num_attention_heads=8, num_key_value_heads=8,
                                max_position_embeddings=4096, rope_parameters={"rope_type": "default",
                                                                               "rope_theta": 500000.0}, **extra)


@pytest.mark.parametrize("kind", KINDS)
def test_config_written_as_transformers_reads_it(kind, quiet):
    hf = apply_rope_scaling(_llama_config(), RopeScalingConfig(type=kind, factor=4.0))
    p = hf.rope_parameters
    assert p["rope_type"] == kind and p["factor"] == 4.0 and p["rope_theta"] == 500000.0
    assert hf.max_position_embeddings == (4096 if kind == "dynamic" else 16384)
    assert context_length(hf) == 16384
    if kind in ("yarn", "llama3"):
        assert p["original_max_position_embeddings"] == 4096
    inv, attention = ROPE_INIT_FUNCTIONS[kind](hf)  # transformers accepts it
    assert inv.shape == (64,)
    assert math.isclose(attention, 0.1 * math.log(4.0) + 1 if kind == "yarn" else 1.0, rel_tol=1e-12)


@pytest.mark.parametrize("kind", KINDS)
def test_cos_sin_equal_transformers_rotary(kind, quiet):
    hf = apply_rope_scaling(_llama_config(), RopeScalingConfig(type=kind, factor=4.0))
    rc = decoder_config(hf).rope[0]
    assert rc.kind == kind
    theirs = LlamaRotaryEmbedding(config=hf)
    x = torch.zeros(1, 1, 128)
    for length in (1000, 4096, 9000, 12288):  # below, at and past the pretraining length
        positions = torch.arange(length)
        want_cos, want_sin = theirs(x, positions[None])
        cos, sin = Rotary(rc)(positions, torch.float32, extent=torch.full((length,), length))
        assert (cos - want_cos[0]).abs().max().item() < 1e-6, length
        assert (sin - want_sin[0]).abs().max().item() < 1e-6, length
        plain = LlamaRotaryEmbedding(config=_llama_config())(x, positions[None])[0][0]
        changed = (cos - plain).abs().max().item()
        if kind == "dynamic" and length <= 4096:
            assert changed == 0.0  # dynamic NTK is plain RoPE up to the pretraining length
        else:
            assert changed > 1e-3


def test_dynamic_frequencies_equal_transformers_init_per_length(quiet):
    """Each sample's dynamic NTK frequencies are ROPE_INIT_FUNCTIONS['dynamic'] at that sample's length."""
    hf = apply_rope_scaling(_llama_config(), RopeScalingConfig(type="dynamic", factor=8.0))
    rc = decoder_config(hf).rope[0]
    lengths = [10, 4096, 5000, 30000]
    positions = torch.tensor([n - 1 for n in lengths])
    cos, _ = Rotary(rc)(positions, torch.float32, extent=torch.tensor(lengths))
    for row, n in enumerate(lengths):
        inv, _ = ROPE_INIT_FUNCTIONS["dynamic"](hf, seq_len=torch.tensor(n))
        angles = (n - 1) * inv
        assert (cos[row] - torch.cat((angles, angles)).cos()).abs().max().item() < 1e-6


@pytest.fixture(scope="module")
def plain_llama(tmp_path_factory):
    """The tiny Llama with plain RoPE (decoder_families' Llama carries llama3 scaling already)."""
    torch.manual_seed(0)
    config = AutoConfig.for_model("llama", **{**SHAPE, "max_position_embeddings": 16})
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.randn_like(p) * 0.08 if p.dim() >= 2 else torch.randn_like(p) * 0.1 + 1.0)
    folder = tmp_path_factory.mktemp("plain-llama")
    model.save_pretrained(folder)
    return folder


@pytest.mark.parametrize("kind", KINDS)
def test_decoder_logits_equal_hf_with_scaling(kind, plain_llama, quiet):
    cfg = run_config(plain_llama, f"model.rope_scaling.type={kind}", "model.rope_scaling.factor=4")
    hf, dec = load_pair(cfg)
    assert hf.config.rope_parameters["rope_type"] == kind
    ids = sample_ids(LENGTHS)
    with torch.no_grad():
        ref = hf_logits(hf, ids)
        packed = dec(torch.cat(ids), Boundaries.from_lengths(LENGTHS))
        plain_hf, _ = load_pair(run_config(plain_llama))
        plain = hf_logits(plain_hf, ids)
    assert ref.abs().max() > 0.5
    assert (packed - ref).abs().max().item() < 1e-5
    assert (ref - plain).abs().max().item() > 1e-2  # the scaling changed the model


def test_bad_rope_scaling_is_named(plain_llama, tmp_path, quiet):
    with pytest.raises(ConfigError, match="model.rope_scaling.factor must be > 1"):
        load_config(None, [f"model.path={plain_llama}", "model.rope_scaling.type=yarn"])
    with pytest.raises(ConfigError, match="low_freq_factor < high_freq_factor"):
        load_config(None, [f"model.path={plain_llama}", "model.rope_scaling.type=llama3",
                           "model.rope_scaling.factor=2", "model.rope_scaling.low_freq_factor=5"])
    scaled = AutoConfig.for_model("llama", rope_parameters={"rope_type": "linear", "factor": 2.0,
                                                            "rope_theta": 10000.0})
    with pytest.raises(ModelError, match="already scaled"):
        apply_rope_scaling(scaled, RopeScalingConfig(type="yarn", factor=2.0))


def test_memory_plan_follows_max_length_and_context(plain_llama, quiet):
    from loratune.model.memory import plan_run

    short = plan_run(run_config(plain_llama, "data.max_length=64", "train.batch_size=1"), device="cpu",
                     budget=1 << 40)
    assert "of the model's 16" in short.context and "warning" in short.context
    long_cfg = run_config(plain_llama, "data.max_length=64", "train.batch_size=1", "model.rope_scaling.type=yarn",
                          "model.rope_scaling.factor=4")
    stretched = plan_run(long_cfg, device="cpu", budget=1 << 40)
    assert stretched.context == "context: data.max_length 64 tokens of the model's 64 (RoPE yarn x4)"
    assert stretched.plan.seq_len == 64
    assert stretched.plan.total == short.plan.total  # the same shapes: RoPE scaling costs no memory


def test_plan_through_the_cli_plans_the_stretched_context(plain_llama, tmp_path, capsys, quiet):
    from loratune.cli import main

    config = tmp_path / "long.yaml"
    config.write_text(f"model:\n  path: {plain_llama}\n  rope_scaling: {{type: linear, factor: 8}}\n"
                      "quantization: {bits: 32}\ndata:\n  max_length: 128\ntrain: {batch_size: 1}\n", encoding="utf-8")
    assert main(["plan", str(config), "--device", "cpu", "--budget-gib", "64"]) == 0
    out = capsys.readouterr().out
    assert "context: data.max_length 128 tokens of the model's 128 (RoPE linear x8)" in out
    assert "1 x 128 tokens" in out
    assert main(["plan", str(config), "--device", "cpu", "--budget-gib", "64", "model.rope_scaling.factor=0.5"]) == 2
    assert "model.rope_scaling.factor must be > 1" in capsys.readouterr().err
