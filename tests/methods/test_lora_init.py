"""adapter.init: PiSSA, OLoRA, gaussian and LoftQ on both model codes, checked against peft's own numbers; the
converted PiSSA/OLoRA adapter applies to the original base through `PeftModel.from_pretrained`; resume reads it
back; the config refuses what cannot work."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from loratune.config import load_config
from loratune.errors import ConfigError
from loratune.model.build import build_trainable
from loratune.model.memory import load_model_config
from loratune.model.lora_init import loftq_factors, olora_factors, pissa_factors
from loratune.model.resolve import decide

IDS = torch.tensor([[5, 9, 14, 3, 7, 11, 4, 8, 21, 30]])


def _cfg(folder: Path, *overrides: str):
    return load_config(None, [f"model.path={folder}", "adapter.rank=4", "adapter.alpha=8", "adapter.dropout=0",
                              *overrides])


def _build(cfg):
    torch.manual_seed(0)
    return build_trainable(cfg, decide(cfg, "cpu", load_model_config(cfg)))


def _peft_layer(model, name: str = "model.layers.0.self_attn.q_proj"):
    return model.get_submodule("base_model.model." + name)


def _logits(model, decoder: bool) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS) if decoder else model(input_ids=IDS).logits


@pytest.mark.parametrize("init", ["pissa", "olora", "gaussian"])
def test_decoder_init_matches_peft(tiny_llama: Path, init: str) -> None:
    cfg = _cfg(tiny_llama, "quantization.bits=32", f"adapter.init={init}")
    ours = _build(cfg).module
    peft = _build(load_config(None, [f"model.path={tiny_llama}", "adapter.rank=4", "adapter.alpha=8",
                                     "adapter.dropout=0", "quantization.bits=32", f"adapter.init={init}",
                                     "model.implementation=transformers"])).module
    base = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
    for ours_name, hf in (("layers.0.attn.q_proj", "model.layers.0.self_attn.q_proj"),
                          ("layers.1.mlp.down_proj", "model.layers.1.mlp.down_proj")):
        mine, theirs = ours.get_submodule(ours_name), _peft_layer(peft, hf)
        if init == "gaussian":  # random: the distribution, not the draw
            assert mine.lora_A.std().item() == pytest.approx(1 / 4, rel=0.15)
            assert theirs.lora_A["default"].weight.std().item() == pytest.approx(1 / 4, rel=0.15)
            assert not mine.lora_B.any()
            continue
        # singular vectors / QR columns are unique up to sign: compare the products and the residual base
        a, b = theirs.lora_A["default"].weight, theirs.lora_B["default"].weight
        torch.testing.assert_close(mine.lora_B @ mine.lora_A, b @ a, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(mine.weight, theirs.get_base_layer().weight, rtol=1e-4, atol=1e-5)
        w = base.get_submodule(hf).weight
        torch.testing.assert_close(mine.weight + mine.scale * mine.lora_B @ mine.lora_A, w, rtol=1e-4, atol=1e-5)
    if init != "gaussian":  # the model is unchanged at step 0
        torch.testing.assert_close(_logits(ours, True), _logits(base, False), rtol=1e-4, atol=1e-4)


def test_factors_equal_pefts_formulas() -> None:
    from peft.utils.loftq_utils import _low_rank_decomposition

    torch.manual_seed(0)
    w = torch.randn(24, 16)
    a, b = pissa_factors(w, 4, 2.0)
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    torch.testing.assert_close(b @ a * 2.0, u[:, :4] @ torch.diag(s[:4]) @ vh[:4])
    a, b = olora_factors(w, 4)
    q, r = torch.linalg.qr(w)
    torch.testing.assert_close(a, r[:4])
    torch.testing.assert_close(b, q[:, :4])
    wq = w + 0.1 * torch.randn(24, 16)
    a, b = loftq_factors(w, wq, 4, 2.0)
    ref = _low_rank_decomposition((w - wq) / 2.0, reduced_rank=4)  # peft's LoftQ decomposition
    torch.testing.assert_close(a, ref["R"], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(b, ref["L"], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("implementation", ["loratune", "transformers"])
def test_loftq_absorbs_the_quantization_error(tiny_llama: Path, implementation: str) -> None:
    from loratune.model.lora_init import dequantized

    cfg = _cfg(tiny_llama, "adapter.init=loftq", f"model.implementation={implementation}")
    model = _build(cfg).module
    base = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
    for ours_name, hf in (("layers.0.attn.q_proj", "model.layers.0.self_attn.q_proj"),
                          ("layers.1.mlp.up_proj", "model.layers.1.mlp.up_proj")):
        w = base.get_submodule(hf).weight
        if implementation == "loratune":
            m = model.get_submodule(ours_name)
            q, a, b, scale = dequantized(m.weight), m.lora_A, m.lora_B, m.scale
        else:
            m = _peft_layer(model, hf)
            q = dequantized(m.get_base_layer().weight)
            a, b, scale = m.lora_A["default"].weight, m.lora_B["default"].weight, m.scaling["default"]
        ref_a, ref_b = loftq_factors(w, q, 4, scale)
        torch.testing.assert_close(b @ a, ref_b @ ref_a, rtol=1e-4, atol=1e-6)
        before, after = (w - q).norm(), (w - q - scale * b @ a).norm()
        u, s, vh = torch.linalg.svd(w - q)
        assert after.item() == pytest.approx(s[4:].norm().item(), rel=1e-4)  # Eckart-Young: the best rank 4
        assert after < before


@pytest.mark.parametrize("implementation, init", [("loratune", "pissa"), ("transformers", "pissa"),
                                                  ("loratune", "olora"), ("loratune", "pissa_niter_4")])
def test_saved_adapter_applies_to_the_original_base(tmp_path: Path, tiny_llama: Path, implementation: str,
                                                    init: str) -> None:
    from peft import PeftModel

    cfg = _cfg(tiny_llama, "quantization.bits=32", f"adapter.init={init}", f"model.implementation={implementation}")
    tm = _build(cfg)
    decoder = implementation == "loratune"
    with torch.no_grad():  # a trained adapter: every weight moved
        for p in tm.module.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    trained = _logits(tm.module, decoder)
    tm.save(tmp_path / "a")
    base = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
    reloaded = PeftModel.from_pretrained(base, tmp_path / "a")
    assert reloaded.peft_config["default"].r == 8
    torch.testing.assert_close(_logits(reloaded, False), trained, rtol=1e-4, atol=1e-4)
    # resume: the run's own rank-4 weights come back exactly
    want = {n: p.detach().clone() for n, p in tm.module.named_parameters() if p.requires_grad}
    with torch.no_grad():
        for p in tm.module.parameters():
            if p.requires_grad:
                p.zero_()
    tm.load_weights(tmp_path / "a")
    for n, p in tm.module.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p, want[n], rtol=0, atol=1e-7)


def test_resume_refuses_another_initialisation(tmp_path: Path, tiny_llama: Path) -> None:
    from loratune.errors import ModelError

    tm = _build(_cfg(tiny_llama, "quantization.bits=32", "adapter.init=pissa"))
    tm.save(tmp_path / "a")
    other = _build(_cfg(tiny_llama, "quantization.bits=32", "adapter.init=olora"))
    with pytest.raises(ModelError, match="not initialised as this run"):
        other.load_weights(tmp_path / "a")


@pytest.mark.parametrize("overrides, message", [
    (["adapter.init=pisa"], "expected one of"),
    (["adapter.init=pissa"], "16 or 32"),
    (["adapter.init=olora", "quantization.bits=8"], "16 or 32"),
    (["adapter.init=loftq", "quantization.bits=16"], "needs quantization.bits 4"),
    (["adapter.init=pissa", "adapter.type=none", "quantization.bits=32"], "adapter.type lora"),
    (["adapter.init=olora", "quantization.bits=16", "train.method=dpo"], "reference policy"),
    (["adapter.init=pissa", "quantization.bits=16", "train.strategy=fsdp"], "strategy fsdp"),
])
def test_config_refuses(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(None, ["model.path=demo://llama", *overrides])


def test_rslora_conversion_keeps_the_scale(tmp_path: Path, tiny_llama: Path) -> None:
    import json

    tm = _build(_cfg(tiny_llama, "quantization.bits=32", "adapter.init=pissa", "adapter.rslora=true"))
    tm.save(tmp_path / "a")
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert config["r"] == 8 and config["init_lora_weights"] is True
    assert config["lora_alpha"] / math.sqrt(8) == pytest.approx(8 / math.sqrt(4))


@pytest.mark.parametrize("overrides", [["quantization.bits=32", "adapter.init=pissa_niter_2"], ["adapter.init=loftq"]])
def test_train_runs_with_the_init(tmp_path: Path, tiny_llama: Path, overrides: list[str]) -> None:
    from peft import PeftModel
    from train_helpers import write_run_yaml

    from loratune.cli import main

    path = write_run_yaml(tmp_path, tiny_llama, train={"max_steps": 2, "save_every": 1})
    assert main(["train", str(path), *overrides]) == 0
    out = tmp_path / "out"
    base = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, out)
    assert model.peft_config["default"].r == (8 if "pissa" in overrides[-1] else 4)
    assert main(["train", str(path), *overrides, "train.max_steps=3", "train.allow_config_change=true"]) == 0
