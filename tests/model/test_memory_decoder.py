"""The memory plan of loratune's decoder on CUDA against its peaks measured on the H200 (docs/benchmarks.md,
2026-12-02: benchmarks/bench_train.py's `decoder` variant, Llama-3-8B shape, NF4, r=16 on all seven projections,
AdamW, checkpointing): never under a measured peak, at most 5% over it; and the attention term's parts."""

from __future__ import annotations

import pytest
from transformers import AutoConfig

from loratune.config import load_config
from loratune.model.memory import GiB, Shape, estimate

TARGETS = "[q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj]"
LLAMA3_8B = dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                 num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=False)
# (tokens of the micro-batch, torch.cuda.max_memory_allocated GiB): 2 x 2048 as one stream of two samples,
# 1 x 16384 (FlexAttention, torch 2.11, bitsandbytes 0.50.2)
MEASURED = [(4096, 7.78), (16384, 13.13)]


def _cfg():
    return load_config(None, ["model.path=unused", "quantization.bits=4", "quantization.compute_dtype=bf16",
                              "adapter.rank=16", "adapter.alpha=32", "adapter.dropout=0.0",
                              f"adapter.target_modules={TARGETS}", "train.gradient_checkpointing=true",
                              "train.optimizer=adamw"])


def _plan(tokens: int, stream_attention: bool = True):
    return estimate(_cfg(), AutoConfig.for_model("llama", **LLAMA3_8B), 1, tokens, "cuda", embed_on_host=False,
                    fused_mlp=True, graphs=False, tokens=tokens, padding_free=True, stream_attention=stream_attention)


@pytest.mark.parametrize(("tokens", "peak"), MEASURED)
def test_the_decoder_plan_is_never_under_and_at_most_5_percent_over(tokens: int, peak: float) -> None:
    planned = _plan(tokens).total / GiB
    assert peak <= planned <= 1.05 * peak, (tokens, planned, peak)


def test_the_attention_term() -> None:
    shape = Shape.from_config(AutoConfig.for_model("llama", **LLAMA3_8B))
    for tokens in (2048, 4096, 16384):
        extra = _plan(tokens).total - _plan(tokens, stream_attention=False).total
        q = shape.q_dim
        assert extra == max(tokens * tokens, 2 * tokens * q * 2) + tokens * q * 2
    # at 16384 tokens the [T, T] mask and the repeated kv heads are the same size for this shape
    assert 16384 * 16384 == 2 * 16384 * 4096 * 2
