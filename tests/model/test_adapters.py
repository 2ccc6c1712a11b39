"""The adapter switches (rsLoRA, DoRA, modules_to_save) and activation checkpointing really take effect."""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import bitsandbytes as bnb
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from loratune.config import Config, load_config
from loratune.errors import ModelError
from loratune.model.adapters import attach_adapters, count_parameters
from loratune.model.build import build_model
from loratune.model.load import enable_checkpointing, load_base
from loratune.model.quant import bnb_config


def cfg_for(folder: Path, *overrides: str) -> Config:
    return load_config(None, [f"model.path={folder}", "adapter.rank=4", "adapter.alpha=8", "adapter.dropout=0",
                              *overrides])


def _lora_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    return [m for m in model.modules() if hasattr(m, "lora_A") and "default" in m.lora_A]


@pytest.mark.parametrize("rslora, scale", [(False, 8 / 4), (True, 8 / math.sqrt(4))])
def test_rslora_scales_by_alpha_over_sqrt_r(tiny_llama: Path, rslora: bool, scale: float) -> None:
    cfg = cfg_for(tiny_llama, f"adapter.rslora={str(rslora).lower()}")
    layers = _lora_layers(attach_adapters(load_base(cfg), cfg.adapter))
    assert layers and all(m.scaling["default"] == pytest.approx(scale) for m in layers)


def test_dora_adds_trained_magnitudes_and_starts_at_the_base(tiny_llama: Path) -> None:
    cfg = cfg_for(tiny_llama, "adapter.dora=true")  # on the 4-bit NF4 base
    base = load_base(cfg).eval()
    ids = torch.randint(5, 400, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():  # the no-grad eval forward that bitsandbytes would answer by repacking (quant.py)
        before = base(ids).logits
    model = attach_adapters(base, cfg.adapter).eval()
    layers = _lora_layers(model)
    assert len(layers) == 7 * model.config.num_hidden_layers
    assert all("default" in m.lora_magnitude_vector for m in layers)
    with torch.no_grad():  # B = 0 and magnitude = |W|: the adapted model starts as the base
        assert torch.allclose(model(ids).logits, before, atol=1e-4)
    model.train()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torch warns when backprop meets an op without autograd (gemv_4bit)
        model(ids, labels=ids).loss.backward()
    # every magnitude, not just those of o_proj/down_proj that feed the residual stream directly
    magnitudes = [m.lora_magnitude_vector["default"].weight for m in layers]
    assert all(p.requires_grad and p.grad is not None and float(p.grad.abs().sum()) > 0 for p in magnitudes)
    assert all(float(m.lora_A["default"].weight.grad.abs().sum()) == 0 for m in layers)  # B = 0: no dA yet
    assert all(float(m.lora_B["default"].weight.grad.abs().sum()) > 0 for m in layers)


def _repacked(model: torch.nn.Module) -> int:
    return sum(bool(getattr(m.weight.quant_state, "packing_format_for_cpu", False))
               for m in model.modules() if isinstance(m, bnb.nn.Linear4bit))


def test_eval_forward_leaves_the_4bit_weights_as_loaded(tiny_llama: Path) -> None:
    base = load_base(cfg_for(tiny_llama)).eval()
    q = base.model.layers[0].self_attn.q_proj
    packed, absmax = q.weight.data.clone(), q.weight.quant_state.absmax.clone()
    with torch.no_grad():
        base(torch.tensor([[5, 6, 7]]))
    assert _repacked(base) == 0
    assert torch.equal(q.weight.data, packed) and torch.equal(q.weight.quant_state.absmax, absmax)


@pytest.mark.skipif(not bnb.functional.has_avx512bf16(), reason="bitsandbytes repacks only on AVX512-BF16 CPUs")
def test_adapters_refuse_a_base_repacked_for_cpu_inference(tiny_llama: Path) -> None:
    cfg = cfg_for(tiny_llama)
    base = AutoModelForCausalLM.from_pretrained(  # not through load_base: bitsandbytes' defaults
        tiny_llama, quantization_config=bnb_config(cfg.quantization, torch.float32), dtype=torch.float32).eval()
    with torch.no_grad():
        base(torch.tensor([[5, 6, 7]]))
    assert _repacked(base) == 7 * base.config.num_hidden_layers
    with pytest.raises(ModelError, match=r"14 4-bit layers \(first: model.layers.0.self_attn.q_proj\) were repacked"):
        attach_adapters(base, cfg.adapter)


def test_modules_to_save_are_trained_in_full_and_saved(tmp_path: Path, tiny_llama: Path) -> None:
    plain = cfg_for(tiny_llama)
    cfg = cfg_for(tiny_llama, "adapter.modules_to_save=[lm_head]")
    without, _ = count_parameters(attach_adapters(load_base(plain), plain.adapter))
    model = attach_adapters(load_base(cfg), cfg.adapter)
    trainable, _ = count_parameters(model)
    head = model.get_output_embeddings()
    assert trainable == without + head.weight.numel()
    model.save_pretrained(tmp_path)
    saved = load_file(str(tmp_path / "adapter_model.safetensors"))
    assert any("lm_head" in k for k in saved)


@pytest.mark.parametrize("bits, mode, expected", [(4, "auto", True), (8, "auto", True), (16, "auto", False),
                                                  (16, "true", True), (4, "false", False)])
def test_activation_checkpointing_default_and_non_reentrant(tiny_llama: Path, bits: int, mode: str,
                                                            expected: bool) -> None:
    cfg = cfg_for(tiny_llama, f"quantization.bits={bits}", f"train.gradient_checkpointing={mode}")
    model = load_base(cfg)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # neither transformers' deprecation notices nor anything else
        assert enable_checkpointing(model, cfg) is expected
    layers = [m for m in model.modules() if hasattr(m, "gradient_checkpointing")]
    assert layers and any(m.gradient_checkpointing for m in layers) is expected
    if expected:
        fn = next(m for m in layers if m.gradient_checkpointing)._gradient_checkpointing_func
        assert fn.keywords.get("use_reentrant") is False


def test_building_the_training_model_warns_about_nothing(tiny_llama: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        build_model(cfg_for(tiny_llama))
