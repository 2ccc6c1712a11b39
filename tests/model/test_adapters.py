"""The adapter switches (rsLoRA, DoRA, modules_to_save) and activation checkpointing really take effect."""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from loratune.config import Config, load_config
from loratune.model.adapters import attach_adapters, count_parameters
from loratune.model.build import build_model
from loratune.model.load import enable_checkpointing, load_base


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
    with torch.no_grad():
        before = base(ids).logits
    model = attach_adapters(base, cfg.adapter).eval()
    layers = _lora_layers(model)
    assert layers and all("default" in m.lora_magnitude_vector for m in layers)
    with torch.no_grad():  # B = 0 and magnitude = |W|: the adapted model starts as the base
        assert torch.allclose(model(ids).logits, before, atol=1e-4)
    model.train()
    model(ids, labels=ids).loss.backward()
    magnitude = layers[0].lora_magnitude_vector["default"].weight
    assert magnitude.requires_grad and magnitude.grad is not None and magnitude.grad.abs().sum() > 0


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
