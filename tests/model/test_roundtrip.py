"""A few QLoRA steps lower the loss; the saved adapter reloads through peft with identical logits."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from peft import PeftModel

from loratune.config import load_config
from loratune.model.adapters import attach_adapters
from loratune.model.load import load_base
from loratune.train.loss import lm_loss_sum
from loratune.train.optim import build_optimizer


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_steps_lower_loss_and_adapter_reloads(tiny_models: dict[str, Path], tmp_path: Path, family: str) -> None:
    cfg = load_config(None, [f"model.path={tiny_models[family]}", "adapter.rank=8", "adapter.alpha=16",
                             "adapter.dropout=0", "train.lr=3e-3", "train.optimizer=paged_adamw_32bit"])
    torch.manual_seed(0)
    model = attach_adapters(load_base(cfg), cfg.adapter)
    opt = build_optimizer(model, cfg.train)
    ids = torch.randint(5, 400, (2, 32), generator=torch.Generator().manual_seed(1))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    losses = []
    for _ in range(8):
        loss_sum, n = lm_loss_sum(model, batch)
        (loss_sum / n).backward()
        opt.step()
        opt.zero_grad()
        losses.append(float(loss_sum.detach()) / n)
    assert losses[-1] < losses[0] - 0.1, losses

    model.eval()
    with torch.no_grad():
        trained = model(ids).logits
    model.save_pretrained(tmp_path / "adapter")
    saved = sorted(p.name for p in (tmp_path / "adapter").iterdir())
    assert saved == ["README.md", "adapter_config.json", "adapter_model.safetensors"]
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["r"] == 8

    reloaded = PeftModel.from_pretrained(load_base(cfg), tmp_path / "adapter").eval()
    with torch.no_grad():
        again = reloaded(ids).logits
        with reloaded.disable_adapter():  # the same reloaded model, its adapter off
            without = reloaded(ids).logits
        base = load_base(cfg).eval()(ids).logits  # a base loaded on its own, never adapted
    assert torch.allclose(trained, again, atol=1e-5, rtol=0)  # the adapter is what was trained
    assert torch.allclose(without, base, atol=1e-5, rtol=0)  # and the only thing the reload added
    assert (trained - base).abs().max() > 0.5  # and it changes the model's output
