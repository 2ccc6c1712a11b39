"""adapter.init eva: LoRA A from the principal directions of each layer's inputs on training data (B zero), the
same directions peft's EVA finds (rho 1, label mask), on both model codes; a run through `loratune train`."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from train_helpers import write_run_yaml
from transformers import AutoModelForCausalLM

from loratune.config import load_config
from loratune.data.sample import Sample
from loratune.model.build import build_trainable
from loratune.model.eva import eva_directions, init_eva
from loratune.model.memory import load_model_config
from loratune.model.resolve import decide


def _samples(n: int = 6, length: int = 24) -> list[Sample]:
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(n):
        ids = torch.randint(3, 400, (length,), generator=g).tolist()
        out.append(Sample(ids, [-100] * 6 + ids[6:]))
    return out


def _abs_cos(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    a = a / a.norm(dim=1, keepdim=True)
    b = b / b.norm(dim=1, keepdim=True)
    return (a * b).sum(1).abs()


def test_directions_are_the_centred_principal_axes() -> None:
    g = torch.Generator().manual_seed(0)
    basis = torch.linalg.qr(torch.randn(16, 16, generator=g))[0]
    x = (torch.randn(500, 16, generator=g) * torch.tensor([10.0, 5.0, 2.5] + [0.1] * 13)) @ basis.T + 3.0  # offset: centring matters
    a = eva_directions(x, 3)
    assert _abs_cos(a, basis.T[:3]).min() > 0.99


def _model(tiny_llama: Path, implementation: str):
    cfg = load_config(None, [f"model.path={tiny_llama}", "adapter.rank=4", "adapter.alpha=8", "adapter.dropout=0",
                             "quantization.bits=32", "adapter.init=eva", f"model.implementation={implementation}"])
    torch.manual_seed(0)
    return build_trainable(cfg, decide(cfg, "cpu", load_model_config(cfg))).module


@pytest.mark.parametrize("implementation", ["loratune", "transformers"])
def test_eva_matches_peft(tiny_llama: Path, implementation: str) -> None:
    from peft import EvaConfig, LoraConfig
    from peft.tuners.lora.eva import get_eva_state_dict

    samples = _samples()
    model = _model(tiny_llama, implementation)
    assert init_eva(model, samples) == 6 * 18
    base = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
    config = LoraConfig(r=4, lora_alpha=8, init_lora_weights="eva",
                        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
                        eva_config=EvaConfig(rho=1.0, tau=0.99, use_label_mask=True))
    batch = {"input_ids": torch.tensor([s.input_ids for s in samples]),
             "labels": torch.tensor([s.labels for s in samples])}
    theirs = get_eva_state_dict(base, [batch], peft_config=config, show_progress_bar=False)
    pairs = {"layers.0.attn.q_proj": "model.layers.0.self_attn.q_proj",
             "layers.1.mlp.down_proj": "model.layers.1.mlp.down_proj",
             "layers.1.mlp.up_proj": "model.layers.1.mlp.up_proj"}
    for ours, hf in pairs.items():
        if implementation == "loratune":
            layer = model.get_submodule(ours)
            a, b = layer.lora_A, layer.lora_B
        else:
            layer = model.get_submodule("base_model.model." + hf)
            a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
        assert not b.any()
        ref = theirs[hf]
        # peft's randomized incremental PCA: the leading directions agree, the later ones less tightly
        cos = _abs_cos(a[:2], ref[:2])
        assert cos.min() > 0.99, (hf, cos)


def test_train_with_eva(tmp_path: Path, tiny_llama: Path) -> None:
    from loratune.cli import main

    path = write_run_yaml(tmp_path, tiny_llama, train={"max_steps": 2, "save_every": 0})
    assert main(["train", str(path), "adapter.init=eva"]) == 0
    assert (tmp_path / "out" / "adapter_model.safetensors").is_file()
