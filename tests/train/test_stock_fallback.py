"""The transformers + peft fallback runs as the libraries ship: built and trained through the real loop, nothing of
loratune is written into their objects (no replaced forward, no registry entry, no attention switch, no `_loratune`
attribute), and the loss the loop reports is the model's own."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn
from train_helpers import build_loop
from transformers.masking_utils import AttentionMaskInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, AttentionInterface

from loratune.data.sample import Sample
from loratune.model.adapters import is_peft
from loratune.train.loop import LoopState
from loratune.train.loss import full_logits_loss_sum, with_target_rows


def _registries() -> dict[str, dict]:
    """transformers' global attention and mask registries, and the process-wide instance's own entries."""
    return {"attention": dict(AttentionInterface._global_mapping), "mask": dict(AttentionMaskInterface._global_mapping),
            "all_attention": dict(ALL_ATTENTION_FUNCTIONS._local_mapping)}


def _configs(model: nn.Module) -> list:
    """Every distinct transformers config object held by the model's modules."""
    seen: dict[int, object] = {}
    for m in model.modules():
        cfg = getattr(m, "config", None)
        if cfg is not None and hasattr(cfg, "_attn_implementation"):
            seen.setdefault(id(cfg), cfg)
    return list(seen.values())


def _samples() -> list[Sample]:
    """Rows of one length (padded micro-batches without padding: where a fast path would be tempted to switch
    attention to a mask-free kernel), prompts of different lengths."""
    g = torch.Generator().manual_seed(3)
    out = []
    for i in range(8):
        ids = torch.randint(5, 400, (16,), generator=g).tolist()
        out.append(Sample(ids, [-100] * (2 + i % 3) + ids[2 + i % 3:]))
    return out


def _untouched(model: nn.Module) -> None:
    for name, m in model.named_modules():
        assert "forward" not in vars(m), f"{name or 'the model'} has an instance-level forward"
        ours = [k for k in vars(m) if k.startswith("_loratune")]
        assert not ours, f"{name or 'the model'} carries {ours}"
    for cfg in _configs(model):
        assert not [k for k in vars(cfg) if k.startswith("_loratune")]


@pytest.mark.parametrize("batching", ["padded", "padding_free"])
def test_the_fallback_trains_two_steps_as_transformers_and_peft_ship(tiny_llama: Path, batching: str) -> None:
    registries = _registries()
    loop = build_loop(tiny_llama, _samples(), "model.implementation=transformers", "adapter.rank=4",
                      "adapter.dropout=0", "quantization.compute_dtype=fp32", f"train.batching={batching}",
                      "data.max_length=64", "train.batch_size=4", "train.grad_accum=2", "train.max_steps=2",
                      "train.optimizer=adamw", "train.max_grad_norm=0", "train.lr=1e-2")
    model = loop.runner.module
    assert is_peft(model) and loop.graphs is None
    _untouched(model)
    assert _registries() == registries
    configs = _configs(model)
    before = [c._attn_implementation for c in configs]
    assert before and all(a == "sdpa" for a in before)

    seen: list[list] = []  # the attention implementation as every attention module is called
    attention = [m for n, m in model.named_modules() if n.endswith("self_attn")]
    hooks = [m.register_forward_pre_hook(lambda mod, args: seen.append([c._attn_implementation for c in configs]))
             for m in attention]
    start = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    state = LoopState()
    windows = loop.windows(state)
    results, references = [], []
    try:
        for _ in range(2):
            _, _, window = next(windows)
            batches = loop.batches(window)
            with torch.no_grad():  # the model's own forward to full logits, before the step changes the weights
                sums = [full_logits_loss_sum(model, with_target_rows(b)) for b in batches]
            references.append(sum(float(s) for s, _ in sums) / sum(n for _, n in sums))
            results.append(loop.step(state, window))
    finally:
        for h in hooks:
            h.remove()

    assert len(seen) >= 2 * 2 * len(attention) and all(s == before for s in seen)  # also during each step
    assert [c._attn_implementation for c in configs] == before
    assert _registries() == registries
    _untouched(model)
    for r, ref in zip(results, references):
        assert not r.skipped and r.loss == pytest.approx(ref, rel=1e-5)
    trained = dict(model.named_parameters())
    assert all(not torch.equal(trained[n], w) for n, w in start.items())  # every adapter weight moved
