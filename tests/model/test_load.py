"""Model loading: every family in every precision, adapters on every linear layer but the head."""

from __future__ import annotations

import re
from pathlib import Path

import bitsandbytes as bnb
import pytest
import torch
from torch import nn

from loratune.config import Config, load_config
from loratune.errors import ConfigError, ModelError
from loratune.model.adapters import (attach_adapters, count_parameters, expected_lora_parameters,
                                     linear_module_names, select_targets)
from loratune.model.load import load_base, load_tokenizer, resolve_model_path

PRECISIONS = {
    "nf4-dq": (["quantization.bits=4"], bnb.nn.Linear4bit, "nf4"),
    "nf4": (["quantization.bits=4", "quantization.double_quant=false"], bnb.nn.Linear4bit, "nf4"),
    "fp4": (["quantization.bits=4", "quantization.quant_type=fp4"], bnb.nn.Linear4bit, "fp4"),
    "int8": (["quantization.bits=8"], bnb.nn.Linear8bitLt, None),
    "16bit": (["quantization.bits=16"], nn.Linear, None),
}


def cfg_for(folder: Path, *overrides: str) -> Config:
    return load_config(None, [f"model.path={folder}", "adapter.rank=4", "adapter.dropout=0", *overrides])


@pytest.mark.parametrize("precision", list(PRECISIONS))
@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral", "gemma"])
def test_load_and_adapt(tiny_models: dict[str, Path], family: str, precision: str) -> None:
    overrides, layer_type, quant_type = PRECISIONS[precision]
    cfg = cfg_for(tiny_models[family], *overrides)
    model = load_base(cfg)
    head = model.get_output_embeddings()
    linears = linear_module_names(model)
    # 7 projections per decoder layer (q, k, v, o, gate, up, down), never the head
    assert len(linears) == 7 * model.config.num_hidden_layers
    for name in linears:
        mod = model.get_submodule(name)
        assert type(mod) is layer_type, name
        if quant_type:
            assert mod.weight.quant_state.quant_type == quant_type
            assert (mod.weight.quant_state.state2 is not None) == ("quantization.double_quant=false" not in overrides)
    assert not isinstance(head, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt))
    if precision == "nf4-dq":  # embeddings and head are not upcast to fp32 wholesale
        assert model.get_input_embeddings().weight.dtype == torch.float32  # compute dtype on CPU is fp32
    targets = select_targets(model, cfg.adapter)
    expected = expected_lora_parameters(model, targets, rank=4)
    peft_model = attach_adapters(model, cfg.adapter)
    trainable, _ = count_parameters(peft_model)
    assert trainable == expected
    adapted = {n.removeprefix("base_model.model.") for n, m in peft_model.named_modules() if hasattr(m, "lora_A")}
    assert adapted == set(linears)
    assert all(p.dtype == torch.float32 for p in peft_model.parameters() if p.requires_grad)


def test_compute_dtype_bf16_keeps_embeddings_bf16(tiny_llama: Path) -> None:
    model = load_base(cfg_for(tiny_llama, "quantization.compute_dtype=bf16"))
    assert model.get_input_embeddings().weight.dtype == torch.bfloat16
    assert model.get_output_embeddings().weight.dtype == torch.bfloat16
    q = model.model.layers[0].self_attn.q_proj
    assert q.compute_dtype == torch.bfloat16


@pytest.mark.parametrize("family", ["llama", "gemma"])
def test_zero_B_adapter_leaves_logits_unchanged(tiny_models: dict[str, Path], family: str) -> None:
    cfg = cfg_for(tiny_models[family])
    model = load_base(cfg).eval()
    ids = torch.randint(5, 400, (2, 17), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = model(ids).logits
    peft_model = attach_adapters(model, cfg.adapter).eval()
    assert all(float(p.detach().abs().max()) == 0 for n, p in peft_model.named_parameters() if "lora_B" in n)
    with torch.no_grad():
        after = peft_model(ids).logits
    assert torch.equal(before, after)


def test_target_lists_and_excludes(tiny_llama: Path) -> None:
    model = load_base(cfg_for(tiny_llama))
    cfg = cfg_for(tiny_llama, "adapter.target_modules=[q_proj, v_proj]", "adapter.exclude_modules=[layers.1.self_attn.v_proj]")
    targets = select_targets(model, cfg.adapter)
    assert targets == ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj",
                       "model.layers.1.self_attn.q_proj"]
    with pytest.raises(ConfigError, match=r"no linear layer named \['qproj'\].*down_proj, gate_proj, k_proj"):
        select_targets(model, cfg_for(tiny_llama, "adapter.target_modules=[qproj]").adapter)


def test_full_finetune_trains_everything_in_fp32(tiny_llama: Path) -> None:
    cfg = cfg_for(tiny_llama, "quantization.bits=16", "adapter.type=none")
    model = attach_adapters(load_base(cfg), cfg.adapter)
    trainable, total = count_parameters(model)
    assert trainable == total and all(p.dtype == torch.float32 for p in model.parameters())


def test_tokenizer_hygiene(tiny_models: dict[str, Path]) -> None:
    cases = {  # family: (pad token chosen, pad_is_eos, adds_bos)
        "llama": ("<|eot_id|>", True, True),      # no pad, no unk: eos, recorded and masked by position
        "mistral": ("<unk>", False, True),        # no pad: unk, never eos
        "qwen2": ("<|endoftext|>", False, False),  # own pad, no BOS
        "gemma": ("<pad>", False, True),
    }
    for family, (pad, pad_is_eos, adds_bos) in cases.items():
        tok, info = load_tokenizer(cfg_for(tiny_models[family]).model)
        assert (tok.pad_token, info.pad_is_eos, info.adds_bos) == (pad, pad_is_eos, adds_bos), family
        assert info.pad_id == tok.convert_tokens_to_ids(pad)


def test_demo_scheme_and_missing_model(tmp_path: Path) -> None:
    folder = Path(resolve_model_path("demo://qwen2-test"))
    assert (folder / "config.json").is_file() and (folder / "tokenizer.json").is_file()
    assert resolve_model_path("demo://qwen2-test") == str(folder)  # cached, not rebuilt
    with pytest.raises(ModelError, match=r"unknown demo model 'demo://gpt9'"):
        resolve_model_path("demo://gpt9")
    with pytest.raises(ModelError, match=rf"^no such folder: {re.escape(str(tmp_path / 'nowhere'))}$"):
        load_base(cfg_for(tmp_path / "nowhere"))
    (tmp_path / "empty").mkdir()  # a folder, but no model in it: transformers' reason, on one line
    with pytest.raises(ModelError, match=r"^cannot load the model from '.*empty': [^\n]+$"):
        load_base(cfg_for(tmp_path / "empty"))


def test_nf4_reconstructs_normal_weights_better_than_fp4() -> None:
    """The QLoRA paper's claim, measured: NF4 is the better 4-bit type for N(0, s) weights."""
    w = torch.randn(1024, 1024, generator=torch.Generator().manual_seed(0)) * 0.02
    errors = {}
    for qt in ("nf4", "fp4"):
        packed, state = bnb.functional.quantize_4bit(w, blocksize=64, quant_type=qt)
        back = bnb.functional.dequantize_4bit(packed, state)
        errors[qt] = float((back - w).pow(2).mean().sqrt() / w.pow(2).mean().sqrt())
    assert errors["nf4"] < errors["fp4"]
    assert errors["nf4"] < 0.11 and errors["fp4"] < 0.16  # relative RMS error of 4-bit codes, blocksize 64
