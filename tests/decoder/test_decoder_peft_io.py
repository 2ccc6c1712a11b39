"""Adapters cross between our decoder and peft through PEFT files, both ways, unchanged.

ours -> `save_adapter` -> `peft.PeftModel.from_pretrained(hf_model, folder)`: peft's logits equal ours;
peft's `save_pretrained` -> `load_adapter` -> our logits equal peft's. Families with split and with fused
projections (Phi-3's qkv_proj/gate_up_proj keep their HF names). Files peft could read but our decoder
cannot apply are refused by name.
"""

from __future__ import annotations

import json

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
from peft import PeftModel
from safetensors.torch import load_file, save_file

from loratune.decoder import Boundaries, load_adapter, save_adapter
from loratune.errors import ModelError
from loratune.model.adapters import attach_adapters

TOL = 1e-5


def _ours(dec) -> torch.Tensor:
    with torch.no_grad():
        return dec(torch.cat(sample_ids()), Boundaries.from_lengths(LENGTHS))


@pytest.mark.parametrize("name", ["llama", "gemma2", "gemma3mm", "phi3"])
def test_ours_saved_peft_loads(name, checkpoint, tmp_path, quiet):
    folder = checkpoint(name)
    cfg = run_config(folder, "adapter.rslora=true", "adapter.exclude_modules=[o_proj]")
    hf, dec = load_pair(cfg)
    a = cfg.adapter
    dec.add_adapters(a.rank, a.alpha, 0.05, a.rslora, a.target_modules, tuple(a.exclude_modules), seed=0)
    for layer in dec.adapted_layers().values():  # trained-looking adapters: B no longer zero
        torch.nn.init.normal_(layer.lora_B, std=0.3)
    save_adapter(dec, tmp_path / "ad", base_model_name_or_path=str(folder))
    written = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    assert written["r"] == 4 and written["lora_alpha"] == 8 and written["use_rslora"] is True
    assert written["lora_dropout"] == 0.05 and "o_proj" not in written["target_modules"]
    keys = load_file(tmp_path / "ad" / "adapter_model.safetensors")
    assert len(keys) == 2 * len(dec.adapted_layers())
    peft_model = PeftModel.from_pretrained(hf, tmp_path / "ad").eval()
    injected = {n for n, m in peft_model.named_modules() if "default" in getattr(m, "lora_A", {})}
    assert injected == {"base_model.model." + dec.hf_name(n) for n in dec.adapted_layers()}  # no vision module
    with torch.no_grad():
        ref = hf_logits(peft_model, sample_ids())
    ours = _ours(dec)
    assert (ours - ref).abs().max().item() < TOL
    with torch.no_grad(), peft_model.disable_adapter():  # peft really applied them: without, it answers differently
        assert (hf_logits(peft_model, sample_ids()) - ref).abs().max() > 0.05


@pytest.mark.parametrize("name", ["qwen3", "phi3"])
def test_peft_saved_we_load(name, checkpoint, tmp_path, quiet):
    cfg = run_config(checkpoint(name))
    hf, dec = load_pair(cfg)
    peft_model = attach_adapters(hf, cfg.adapter)
    dec.add_adapters(4, 8)  # only to draw the random weights that attach_random_lora copies into peft's layers
    attach_random_lora(dec, peft_model, seed=5)
    peft_model.save_pretrained(tmp_path / "peft")
    for layer in dec.linear_layers().values():
        layer.remove_adapter()
    assert not dec.adapted_layers()
    names = load_adapter(dec, tmp_path / "peft")
    assert len(names) == len(dec.linear_layers())  # all-linear
    with torch.no_grad():
        ref = hf_logits(peft_model.eval(), sample_ids())
    assert (_ours(dec) - ref).abs().max().item() < TOL


def test_rank_and_alpha_patterns_round_trip(checkpoint, tmp_path, quiet):
    """Per-module ranks and alphas (peft's rank_pattern/alpha_pattern) survive save -> peft -> save -> load."""
    cfg = run_config(checkpoint("mistral"))
    hf, dec = load_pair(cfg)
    dec.add_adapters(4, 8, seed=0)
    layers = dec.linear_layers()
    layers["layers.1.mlp.down_proj"].add_adapter(2, 3.0, casts=dec.casts)
    dec.track_adapters()
    for layer in dec.adapted_layers().values():
        torch.nn.init.normal_(layer.lora_B, std=0.3)
    save_adapter(dec, tmp_path / "a")
    peft_model = PeftModel.from_pretrained(hf, tmp_path / "a").eval()
    with torch.no_grad():
        ref = hf_logits(peft_model, sample_ids())
    assert (_ours(dec) - ref).abs().max().item() < TOL
    peft_model.save_pretrained(tmp_path / "b")
    _, dec2 = load_pair(cfg)
    load_adapter(dec2, tmp_path / "b")
    down = dec2.linear_layers()["layers.1.mlp.down_proj"]
    assert (down.rank, down.alpha) == (2, 3.0)
    assert (_ours(dec2) - ref).abs().max().item() < TOL


def test_refuses_what_it_cannot_apply(checkpoint, tmp_path, quiet):
    cfg = run_config(checkpoint("llama"))
    _, dec = load_pair(cfg)
    dec.add_adapters(4, 8, seed=0)
    save_adapter(dec, tmp_path / "ok")
    config = json.loads((tmp_path / "ok" / "adapter_config.json").read_text())
    dora = tmp_path / "dora"
    dora.mkdir()
    (dora / "adapter_config.json").write_text(json.dumps({**config, "use_dora": True}))
    with pytest.raises(ModelError, match="use_dora is set"):
        load_adapter(dec, dora)
    head = tmp_path / "head"
    head.mkdir()
    (head / "adapter_config.json").write_text(json.dumps(config))
    save_file({"base_model.model.lm_head.lora_A.weight": torch.zeros(4, 64),
               "base_model.model.lm_head.lora_B.weight": torch.zeros(97, 4)}, head / "adapter_model.safetensors")
    with pytest.raises(ModelError, match="'lm_head', which is not a projection"):
        load_adapter(dec, head)
    with pytest.raises(ModelError, match="not a PEFT adapter folder"):
        load_adapter(dec, tmp_path / "missing")
