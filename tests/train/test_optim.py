"""Optimizers, parameter groups, schedules: each runs, saves (safetensors + JSON) and reloads exactly."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from loratune.config import TrainConfig
from loratune.train.optim import build_optimizer, build_scheduler, lr_lambda, param_groups
from loratune.train.trainer_state import (load_optimizer_state, load_scheduler_state, optimizer_state,
                                  scheduler_state)

OPTIMIZERS = ["adamw", "paged_adamw_32bit", "paged_adamw_8bit", "adamw_8bit"]


class Net(nn.Module):
    """Names like a LoRA model's: a big matrix (8-bit optimizer state needs >= 4096 values), a bias, a norm."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.lora_A = nn.Linear(96, 64, bias=False)
        self.lora_B = nn.Linear(64, 96, bias=True)
        self.norm = nn.LayerNorm(96)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.lora_B(self.lora_A(x)))


def _train(model: Net, opt: torch.optim.Optimizer, sched, steps: int, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randn(8, 96, generator=g)
        model(x).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
        sched.step()


def _save_load(opt, sched, tmp_path: Path) -> tuple[dict, dict]:
    tensors, meta = optimizer_state(opt)
    save_file(tensors, str(tmp_path / "opt.safetensors"))
    (tmp_path / "opt.json").write_text(json.dumps({"optimizer": meta, "scheduler": scheduler_state(sched)}))
    return load_file(str(tmp_path / "opt.safetensors")), json.loads((tmp_path / "opt.json").read_text())


@pytest.mark.parametrize("name", OPTIMIZERS)
@pytest.mark.parametrize("schedule", ["constant", "linear", "cosine"])
def test_optimizer_and_schedule_run_save_and_reload_exactly(tmp_path: Path, name: str, schedule: str) -> None:
    cfg = TrainConfig(optimizer=name, scheduler=schedule, lr=1e-2, warmup_steps=2, weight_decay=0.01,
                      loraplus_ratio=4.0)
    a = Net()
    opt_a = build_optimizer(a, cfg)
    sched_a = build_scheduler(opt_a, cfg, total_steps=10)
    _train(a, opt_a, sched_a, 4, seed=1)
    tensors, meta = _save_load(opt_a, sched_a, tmp_path)
    if name in ("paged_adamw_8bit", "adamw_8bit"):  # the big matrix really has 8-bit state
        assert any(t.dtype == torch.uint8 for t in tensors.values())

    b = Net()
    b.load_state_dict(a.state_dict())
    opt_b = build_optimizer(b, cfg)
    sched_b = build_scheduler(opt_b, cfg, total_steps=10)
    load_optimizer_state(opt_b, tensors, meta["optimizer"])
    load_scheduler_state(sched_b, meta["scheduler"])
    assert sched_b.get_last_lr() == sched_a.get_last_lr()
    _train(a, opt_a, sched_a, 3, seed=2)
    _train(b, opt_b, sched_b, 3, seed=2)
    for (n, pa), pb in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(pa, pb), n
    assert sched_b.get_last_lr() == sched_a.get_last_lr()


def test_groups_skip_decay_on_biases_and_norms_and_loraplus_gets_its_lr() -> None:
    net = Net()
    groups = {g["name"]: g for g in param_groups(net, TrainConfig(lr=1e-3, weight_decay=0.1, loraplus_ratio=16))}
    assert {id(p) for p in groups["lora_B"]["params"]} == {id(net.lora_B.weight), id(net.lora_B.bias)}
    assert groups["lora_B"]["lr"] == pytest.approx(16e-3)
    assert {id(p) for p in groups["no_decay"]["params"]} == {id(net.norm.weight), id(net.norm.bias)}
    assert groups["no_decay"]["weight_decay"] == 0.0 and groups["decay"]["weight_decay"] == 0.1
    assert {id(p) for p in groups["decay"]["params"]} == {id(net.lora_A.weight)}
    assert len(groups) == 3
    plain = {g["name"] for g in param_groups(net, TrainConfig(loraplus_ratio=0))}
    assert plain == {"decay", "no_decay"}


def test_loraplus_group_on_a_peft_model(tiny_llama: Path) -> None:
    from loratune.config import load_config
    from loratune.model.adapters import attach_adapters
    from loratune.model.load import load_base

    cfg = load_config(None, [f"model.path={tiny_llama}", "quantization.bits=32", "adapter.rank=4",
                             "train.loraplus_ratio=8", "train.lr=1e-4"])
    model = attach_adapters(load_base(cfg), cfg.adapter)
    opt = build_optimizer(model, cfg.train)
    by_name = {g["name"]: g for g in opt.param_groups}
    b_ids = {id(p) for n, p in model.named_parameters() if "lora_B" in n}
    assert {id(p) for p in by_name["lora_B"]["params"]} == b_ids
    assert by_name["lora_B"]["lr"] == pytest.approx(8e-4)
    assert all("lora_B" not in n for n, p in model.named_parameters()
               if p.requires_grad and id(p) in {id(q) for q in by_name["decay"]["params"]})


@pytest.mark.parametrize("kind", ["constant", "linear", "cosine"])
def test_schedules(kind: str) -> None:
    f = lr_lambda(kind, warmup=4, total=20)
    assert [f(s) for s in range(4)] == pytest.approx([0.2, 0.4, 0.6, 0.8])  # warmup never starts at 0
    assert f(4) == pytest.approx(1.0)
    end = {"constant": 1.0, "linear": 0.0, "cosine": 0.0}[kind]
    mid = {"constant": 1.0, "linear": 0.5, "cosine": 0.5}[kind]
    assert f(20) == pytest.approx(end, abs=1e-12) and f(12) == pytest.approx(mid)
    assert all(math.isfinite(f(s)) and 0 <= f(s) <= 1 for s in range(40))


def test_warmup_ratio_and_steps() -> None:
    from loratune.train.optim import warmup_steps

    assert warmup_steps(TrainConfig(warmup_ratio=0.1), 200) == 20
    assert warmup_steps(TrainConfig(warmup_ratio=0.1, warmup_steps=7), 200) == 7
