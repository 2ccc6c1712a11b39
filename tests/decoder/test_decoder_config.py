"""DecoderConfig from HF configs: each family's traits read from its fields, RoPE as transformers computes it,
and a clear ModelError for what the decoder does not compute."""

from __future__ import annotations

import math

import pytest
import torch
from decoder_families import NAMES, hf_config
from transformers import AutoConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from loratune.decoder.config import decoder_config
from loratune.decoder.rope import inverse_frequencies
from loratune.errors import ModelError


def test_family_traits_come_from_the_config(quiet):
    c = {name: decoder_config(hf_config(name)) for name in NAMES}
    assert c["llama"].rope[0].kind == "llama3" and c["llama"].windows == (None, None)
    assert c["mistral"].windows == (5, 5)
    assert (c["qwen2"].qkv_bias, c["qwen2"].o_bias, c["qwen2"].windows) == (True, False, (None, 4))
    assert c["qwen3"].qk_norm and c["qwen3"].rope[0].kind == "yarn" and c["qwen3"].head_dim == 16
    assert c["gemma"].norm_unit_offset and c["gemma"].embed_scale == 8.0 and c["gemma"].activation == "gelu_tanh"
    g2 = c["gemma2"]
    assert (g2.attn_softcap, g2.final_softcap, g2.windows, g2.sandwich_norms) == (5.0, 3.0, (4, None), True)
    assert g2.attn_scale == 16 ** -0.5 and g2.tie_embeddings
    g3 = c["gemma3"]
    assert g3.qk_norm and g3.attn_softcap is None and [r.kind for r in g3.rope] == ["default", "linear"]
    assert [r.theta for r in g3.rope] == [10000.0, 1000000.0]
    mm = c["gemma3mm"]  # the same text decoder, under model.language_model beside a vision tower
    assert mm.hf_prefix == "model.language_model." and mm.hf_ignored == ("model.vision_tower.",
                                                                         "model.multi_modal_projector.")
    assert mm.qk_norm and mm.windows == (4, None) and mm.sandwich_norms
    p3 = c["phi3"]
    assert p3.fused_qkv and p3.fused_gate_up and p3.windows == (6, 6)
    assert p3.rope[0].kind == "longrope" and p3.rope[0].rotary_dim == 8 and p3.rope[0].original_max_position == 8


ROPES = {
    "linear": {"rope_type": "linear", "factor": 4.0},
    "llama3": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192},
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 4096},
    "yarn-mscale": {"rope_type": "yarn", "factor": 40.0, "original_max_position_embeddings": 4096, "mscale": 1.0,
                    "mscale_all_dim": 0.707, "beta_fast": 16, "truncate": False},
    "longrope": {"rope_type": "longrope", "short_factor": [1.0 + i / 10 for i in range(64)],
                 "long_factor": [2.0 + i for i in range(64)], "original_max_position_embeddings": 4096},
}


@pytest.mark.parametrize("kind", list(ROPES))
def test_rope_frequencies_equal_transformers(kind, quiet):
    """Our inverse frequencies and attention factor equal transformers' ROPE_INIT_FUNCTIONS for a Llama-3.1-like
    head (128 dims); longrope's long set equals what transformers uses past the pretraining length."""
    hf = AutoConfig.for_model("llama", hidden_size=1024, num_attention_heads=8, max_position_embeddings=32768,
                              rope_parameters={"rope_theta": 500000.0, **ROPES[kind]})
    rc = decoder_config(hf).rope[0]
    want, factor = ROPE_INIT_FUNCTIONS[ROPES[kind]["rope_type"]](hf)
    ours, long = inverse_frequencies(rc)
    assert torch.equal(ours, want)
    assert math.isclose(rc.attention_factor, factor, rel_tol=1e-12)
    if kind == "longrope":
        want_long, _ = ROPE_INIT_FUNCTIONS["longrope"](hf, seq_len=4097)
        assert torch.equal(long, want_long)


@pytest.mark.parametrize(("model_type", "extra", "message"), [
    ("gpt2", {}, "does not cover model_type 'gpt2'"),
    ("llama", {"rope_parameters": {"rope_type": "proportional", "factor": 2.0, "rope_theta": 10000.0}},
     "rope_type 'proportional' is not computed"),
    ("llama", {"hidden_act": "relu"}, "hidden_act='relu'"),
    ("gemma2", {"use_bidirectional_attention": True}, "causal only"),
])
def test_unsupported_configs_are_named(model_type, extra, message, quiet):
    with pytest.raises(ModelError, match=message):
        decoder_config(AutoConfig.for_model(model_type, **extra))
