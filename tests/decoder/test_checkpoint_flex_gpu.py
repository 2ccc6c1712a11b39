"""Compiled FlexAttention under activation checkpointing on a CUDA GPU: the backward pass's recompute of a block
takes the forward pass's path (the H200 failure: `CheckpointError ... different metadata`, fp16 after bf16 in
one process, block-mask tensors saved before q by the compiled forward, q first by an eager recompute).

Run on the GPU machine: `python -m pytest tests/decoder/test_checkpoint_flex_gpu.py -q -m gpu -s`.
"""

from __future__ import annotations

import pytest
import torch
from decoder_families import load_pair, run_config

from loratune.decoder import Boundaries, decoder_from_hf
from loratune.decoder.attention import attend

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

LENGTHS = (100, 90, 66)  # 256 tokens: two FlexAttention blocks of queries, three samples


def _grads(folder, dtype: torch.dtype, attention: str, checkpointing: bool) -> dict[str, torch.Tensor]:
    hf = load_pair(run_config(folder))[0].to("cuda", dtype)
    dec = decoder_from_hf(hf, attention=attention, checkpointing=checkpointing)
    dec.add_adapters(4, 8, seed=0)
    with torch.no_grad():
        for layer in dec.adapted_layers().values():
            layer.lora_B.normal_(0.0, 0.3, generator=torch.Generator("cuda").manual_seed(1))
    dec.train()
    ids = torch.randint(3, 97, (sum(LENGTHS),), generator=torch.Generator().manual_seed(2)).cuda()
    dec(ids, Boundaries.from_lengths(LENGTHS, "cuda")).float().square().mean().backward()
    return {n: m.lora_A.grad.float() for n, m in dec.adapted_layers().items()}


def _check(folder, dtype: torch.dtype) -> None:
    want = _grads(folder, dtype, "sdpa", False)
    got = _grads(folder, dtype, "flex", True)
    worst = max(float((got[n] - g).abs().max() / g.abs().max()) for n, g in want.items())
    print(f"{dtype}: flex + checkpointing vs sdpa, worst relative gradient difference {worst:.2e}")
    assert worst < 3e-2


@pytest.mark.parametrize("order", [("bf16", "fp16"), ("fp16", "bf16")])
def test_checkpointed_flex_trains_in_both_precisions_in_one_process(checkpoint, quiet, order):
    dtypes = {"bf16": torch.bfloat16, "fp16": torch.float16}
    for name in order:
        _check(checkpoint("llama"), dtypes[name])


def test_the_recompute_does_not_recompile(checkpoint, quiet):
    """After one step of a shape, another step of that shape compiles nothing: the recompute on autograd's thread
    finds the forward pass's graph (same guards, the intra-op thread count among them)."""
    import torch._dynamo

    _grads(checkpoint("llama"), torch.bfloat16, "flex", True)
    with torch._dynamo.config.patch(error_on_recompile=True):
        _grads(checkpoint("llama"), torch.bfloat16, "flex", True)


def test_checkpointed_flex_after_many_compiled_variants(checkpoint, quiet):
    """More compiled FlexAttention variants in the process than torch's default recompile limit (8): dtypes, grad
    and no-grad, grouped heads, a soft-cap; then a checkpointed backward pass still recomputes compiled."""
    b = Boundaries.from_lengths(LENGTHS, "cuda")
    n = sum(LENGTHS)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        for kv_heads in (4, 2):
            for softcap in (None, 20.0):
                for grad in (False, True):
                    q = torch.randn(n, 4, 16, device="cuda", dtype=dtype, requires_grad=grad)
                    k, v = (torch.randn(n, kv_heads, 16, device="cuda", dtype=dtype) for _ in range(2))
                    out = attend(q, k, v, b, scale=0.25, softcap=softcap, backend="flex")
                    if grad:
                        out.float().sum().backward()
    _check(checkpoint("llama"), torch.float16)


def test_no_grad_calls_reuse_the_training_graph() -> None:
    """A no-grad call (a preference reference pass, evaluation) after a training call of the same shape compiles
    nothing and gives the training call's output bit for bit."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    b = Boundaries.from_lengths((300, 212), "cuda")
    g = torch.Generator("cuda").manual_seed(5)
    q, k, v = (torch.randn(512, h, 16, device="cuda", dtype=torch.bfloat16, generator=g) for h in (4, 2, 2))
    trained = attend(*(t.clone().requires_grad_() for t in (q, k, v)), b, scale=0.25, backend="flex")
    before = counters["stats"]["unique_graphs"]
    with torch.no_grad(), torch._dynamo.config.patch(error_on_recompile=True):
        plain = attend(q, k, v, b, scale=0.25, backend="flex")
    assert counters["stats"]["unique_graphs"] == before
    assert not plain.requires_grad and torch.equal(plain, trained.detach())
