"""A 4-bit base (bitsandbytes on the CPU): our decoder computes HF + peft's logits and LoRA gradients from the
very same quantized tensors.

The base is loaded by loratune's `load_base` in 4-bit (NF4 with double quantization, or FP4 without), the
decoder takes its `Params4bit` weights as they are, and both sides carry the same random LoRA weights.
Our dequantization (`loratune.kernels.nf4`) gives bitsandbytes' values exactly; the products differ in
their summation order only (bitsandbytes 0.50 multiplies through its own 4-bit GEMM op on the CPU), so the
tolerance is wider than the dense one. Measured over all 8 families x both formats: logits within 1.2e-5
(logits of order 1), gradients within 2e-5 of their largest entry. Asserted: 3e-5 and 5e-5.
"""

from __future__ import annotations

import bitsandbytes as bnb
import pytest
import torch
from decoder_families import (
    LENGTHS,
    attach_random_lora,
    hf_logits,
    load_pair,
    run_config,
    sample_ids,
)

from loratune.decoder import Boundaries
from loratune.decoder.keys import hf_module_name
from loratune.model.adapters import attach_adapters

LOGITS_TOL, GRAD_TOL = 3e-5, 5e-5
FORMATS = {"nf4-dq": ("quantization.quant_type=nf4", "quantization.double_quant=true"),
           "fp4": ("quantization.quant_type=fp4", "quantization.double_quant=false")}


@pytest.mark.parametrize(("name", "fmt"), [("llama", "nf4-dq"), ("mistral", "nf4-dq"), ("gemma2", "nf4-dq"),
                                           ("phi3", "fp4")])
def test_4bit_lora_matches_hf_peft(name, fmt, checkpoint, quiet):
    cfg = run_config(checkpoint(name), "quantization.bits=4", *FORMATS[fmt])
    hf, dec = load_pair(cfg)
    q_proj = hf.get_submodule(hf_module_name(next(iter(dec.linear_layers()))))
    ours_q = next(iter(dec.linear_layers().values()))
    assert isinstance(q_proj.weight, bnb.nn.Params4bit) and ours_q.weight is q_proj.weight  # shared, not copied
    assert ours_q.weight.quant_state.quant_type == fmt[:3]
    peft_model = attach_adapters(hf, cfg.adapter).train()
    dec.add_adapters(4, 8)
    attach_random_lora(dec, peft_model)
    dec.train()
    ids = sample_ids()
    weights = torch.randn(sum(LENGTHS), 97, generator=torch.Generator().manual_seed(3))
    ref = hf_logits(peft_model, ids)
    (ref * weights).sum().backward()
    ours = dec(torch.cat(ids), Boundaries.from_lengths(LENGTHS))
    (ours * weights).sum().backward()
    assert ref.abs().max() > 0.5
    assert (ours - ref).abs().max().item() < LOGITS_TOL
    modules = dict(peft_model.named_modules())
    for module, layer in dec.adapted_layers().items():
        theirs = modules["base_model.model." + hf_module_name(module)]
        for g, w in ((layer.lora_A.grad, theirs.lora_A["default"].weight.grad),
                     (layer.lora_B.grad, theirs.lora_B["default"].weight.grad)):
            assert (g - w).abs().max().item() < GRAD_TOL * w.abs().max().item(), module


def test_4bit_without_adapters_passes_input_gradients(checkpoint, quiet):
    """A 4-bit layer without an adapter still passes the gradient to its input (its weight dequantized again
    in the backward pass): with adapters on down_proj only, the gradient of layer 0's adapter has to cross
    layer 1's adapter-less 4-bit q/k/v/o and gate/up projections, and equals HF + peft's."""
    cfg = run_config(checkpoint("qwen2"), "quantization.bits=4", "adapter.target_modules=[down_proj]")
    hf, dec = load_pair(cfg)
    peft_model = attach_adapters(hf, cfg.adapter).train()
    dec.add_adapters(4, 8, targets=["down_proj"])
    attach_random_lora(dec, peft_model)
    dec.train()
    ids = sample_ids()
    ref = hf_logits(peft_model, ids)
    ref.square().mean().backward()
    dec(torch.cat(ids), Boundaries.from_lengths(LENGTHS)).square().mean().backward()
    ours = dec.adapted_layers()["layers.0.mlp.down_proj"].lora_A.grad
    theirs = dict(peft_model.named_modules())["base_model.model.model.layers.0.mlp.down_proj"].lora_A["default"].weight.grad
    assert (ours - theirs).abs().max().item() < GRAD_TOL * theirs.abs().max().item()
