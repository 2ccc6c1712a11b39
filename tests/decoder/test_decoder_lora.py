"""With LoRA adapters, our decoder's logits and adapter gradients equal transformers + peft's.

peft's adapters are attached by loratune's own `attach_adapters` (the HF fallback path); ours by
`Decoder.add_adapters` with the same adapter config, so both pick the same modules. A and B are then set to
the same random non-zero values in both. The loss is a fixed random projection of all logits, so every
logit's gradient takes part. Tolerances (fp32): logits within 1e-5 absolute (logits of order 1); each
gradient within 1e-5 of its largest entry (the gradients of a summed loss reach ~100; measured: below 4e-6).
"""

from __future__ import annotations

import pytest
import torch
from decoder_families import (
    LENGTHS,
    NAMES,
    attach_random_lora,
    hf_logits,
    load_pair,
    run_config,
    sample_ids,
)

from loratune.decoder import Boundaries
from loratune.decoder.keys import hf_module_name
from loratune.model.adapters import attach_adapters

TOL = 1e-5


def _pair_with_lora(folder, *overrides):
    cfg = run_config(folder, *overrides)
    hf, dec = load_pair(cfg)
    peft_model = attach_adapters(hf, cfg.adapter)
    a = cfg.adapter
    dec.add_adapters(a.rank, a.alpha, a.dropout, a.rslora, a.target_modules, tuple(a.exclude_modules))
    attach_random_lora(dec, peft_model)
    return peft_model.train(), dec.train()


def _grads(dec, peft_model) -> tuple[dict, dict]:
    ours, theirs = {}, {}
    modules = dict(peft_model.named_modules())
    for name, layer in dec.adapted_layers().items():
        peft_layer = modules["base_model.model." + dec.hf_name(name)]
        ours[name] = (layer.lora_A.grad, layer.lora_B.grad)
        theirs[name] = (peft_layer.lora_A["default"].weight.grad, peft_layer.lora_B["default"].weight.grad)
    return ours, theirs


@pytest.mark.parametrize("name", NAMES)
def test_lora_logits_and_gradients_match_peft(name, checkpoint, quiet):
    peft_model, dec = _pair_with_lora(checkpoint(name))
    ids = sample_ids()
    weights = torch.randn(sum(LENGTHS), 97, generator=torch.Generator().manual_seed(3))
    ref = hf_logits(peft_model, ids)
    (ref * weights).sum().backward()
    ours = dec(torch.cat(ids), Boundaries.from_lengths(LENGTHS))
    (ours * weights).sum().backward()
    assert (ours - ref).abs().max().item() < TOL
    got, want = _grads(dec, peft_model)
    assert len(got) == len(want) == 2 * (4 if name == "phi3" else 7)  # every projection of both blocks
    for module in got:
        for g, w in zip(got[module], want[module]):
            scale = w.abs().max().item()
            assert scale > 1e-3  # the adapters take part in the loss
            assert (g - w).abs().max().item() < TOL * scale, module


def test_adapters_change_the_logits(checkpoint, quiet):
    """A non-zero B moves the logits away from the base's: the comparison above is not base == base."""
    _, dec = _pair_with_lora(checkpoint("qwen2"))
    ids = torch.cat(sample_ids())
    with torch.no_grad():
        adapted = dec(ids, Boundaries.from_lengths(LENGTHS))
        for layer in dec.adapted_layers().values():
            layer.lora_B.zero_()
        base = dec(ids, Boundaries.from_lengths(LENGTHS))
    assert (adapted - base).abs().max() > 0.05


@pytest.mark.parametrize("overrides", [("adapter.rslora=true", "adapter.target_modules=[q_proj,down_proj]"),
                                       ("adapter.exclude_modules=[o_proj,up_proj]",)])
def test_targets_and_rslora_as_peft(overrides, checkpoint, quiet):
    """The same target/exclude lists pick the same modules as peft, and rsLoRA scales as peft's does."""
    peft_model, dec = _pair_with_lora(checkpoint("llama"), *overrides)
    injected = sorted(n[len("base_model.model."):] for n, m in peft_model.named_modules() if hasattr(m, "lora_A")
                      and "default" in getattr(m, "lora_A", {}))
    assert sorted(hf_module_name(n) for n in dec.adapted_layers()) == injected
    ids = sample_ids()
    with torch.no_grad():
        assert (dec(torch.cat(ids), Boundaries.from_lengths(LENGTHS)) - hf_logits(peft_model, ids)).abs().max() < TOL


def test_checkpointing_gives_the_same_gradients(checkpoint, quiet):
    """Recomputing each block in the backward pass changes no gradient."""
    _, dec = _pair_with_lora(checkpoint("gemma3"))
    ids, b = torch.cat(sample_ids()), Boundaries.from_lengths(LENGTHS)
    dec(ids, b).square().mean().backward()
    plain = {n: m.lora_A.grad.clone() for n, m in dec.adapted_layers().items()}
    dec.zero_grad()
    dec.checkpointing = True
    dec(ids, b).square().mean().backward()
    for n, m in dec.adapted_layers().items():
        assert torch.allclose(m.lora_A.grad, plain[n], atol=1e-7), n


def test_adapter_dropout_in_training_only(checkpoint, quiet):
    """Adapter dropout perturbs the adapter's input in training mode and nothing in eval mode."""
    cfg = run_config(checkpoint("mistral"))
    _, dec = load_pair(cfg)
    dec.add_adapters(4, 8, dropout=0.5, seed=0)
    for layer in dec.adapted_layers().values():
        torch.nn.init.normal_(layer.lora_B, std=0.3)
    ids = torch.cat(sample_ids())
    with torch.no_grad():
        dec.eval()
        e1, e2 = dec(ids), dec(ids)
        dec.train()
        t1 = dec(ids)
    assert torch.equal(e1, e2)
    assert (t1 - e1).abs().max() > 1e-3
