"""Full fine-tuning with the memory-efficient optimizers (train.optimizer galore_adamw, apollo_adamw, adam_mini,
badam; loratune.train.memopt) on the tiny Llama, fp32 on CPU: the loss falls, only the parameters that should
change do, a run resumed from a checkpoint ends on the uninterrupted run's weights bit for bit, and the
combinations that make no sense are refused."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from train_helpers import build_loop, config, run_cli, write_run_yaml

from loratune.config import load_config
from loratune.data.sample import Sample
from loratune.errors import ConfigError
from loratune.train.checkpoint import list_checkpoints, step_of
from loratune.train.loop import LoopState
from loratune.train.run import train

FULL = ["adapter.type=none", "quantization.bits=32", "model.implementation=transformers", "train.max_grad_norm=1.0",
        "train.warmup_steps=0", "train.scheduler=constant"]


def _samples(n: int = 4) -> list[Sample]:
    g = torch.Generator().manual_seed(0)
    ids = [torch.randint(5, 400, (12,), generator=g).tolist() for _ in range(n)]
    return [Sample(x, list(x)) for x in ids]


def _loss(loop, batch) -> float:
    loop.runner.module.eval()
    with torch.no_grad():
        loss_sum, _ = loop.objective.loss_sum(loop.runner, batch)
    return float(loss_sum)


@pytest.mark.parametrize("optimizer, extra", [
    ("galore_adamw", ["train.optim_rank=4", "train.optim_update_proj_gap=2"]),
    ("apollo_adamw", ["train.optim_rank=4", "train.optim_update_proj_gap=2"]),
    ("adam_mini", []),
    ("badam", ["train.badam_switch_every=100"]),
])
def test_loss_falls_and_only_the_right_weights_change(tiny_llama: Path, optimizer: str, extra: list[str]) -> None:
    samples = _samples()
    loop = build_loop(tiny_llama, samples, *FULL, f"train.optimizer={optimizer}", "train.lr=1e-2",
                      "train.batch_size=4", "train.grad_accum=1", "train.max_steps=6", "data.max_length=64",
                      "train.batching=padded", *extra, random_adapters=False)
    model = loop.runner.module
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    window = loop.order(0)[:1]
    batch = loop.batches(window)[0]
    first = _loss(loop, batch)
    state = LoopState()
    for _ in range(6):
        result = loop.step(state, window)
        assert not result.skipped
    last = _loss(loop, batch)
    assert last < first - 0.1, (first, last)
    changed = {n for n, p in model.named_parameters() if not torch.equal(p.detach(), before[n])}
    if optimizer == "badam":  # descending: the last decoder layer only; embeddings, head, norm untouched
        assert changed and all(n.startswith("model.layers.1.") for n in changed), changed
        assert any(".mlp." in n for n in changed) and any(".self_attn." in n for n in changed)
        assert {n for n, p in model.named_parameters() if p.requires_grad} == {
            n for n in before if n.startswith("model.layers.1.")}
    else:  # full fine-tuning: every weight that gets a gradient moves
        assert "model.embed_tokens.weight" in changed and "model.layers.0.self_attn.q_proj.weight" in changed
    if optimizer in ("galore_adamw", "apollo_adamw"):  # the projected weights' moments are rank 4
        opt = loop.optimizer.optimizer
        q = dict(model.named_parameters())["model.layers.0.mlp.up_proj.weight"]
        assert 4 in opt.state[q]["exp_avg"].shape and opt.state[q]["exp_avg"].numel() < q.numel()
        norm = dict(model.named_parameters())["model.norm.weight"]
        assert opt.state[norm]["exp_avg"].shape == norm.shape


def test_badam_switches_blocks_every_k_steps(tiny_llama: Path) -> None:
    loop = build_loop(tiny_llama, _samples(), *FULL, "train.optimizer=badam", "train.badam_switch_every=2",
                      "train.batch_size=4", "train.grad_accum=1", "train.max_steps=6", "data.max_length=64",
                      "train.batching=padded", random_adapters=False)
    model = loop.runner.module
    window, state, trained = loop.order(0)[:1], LoopState(), []
    for _ in range(5):
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        loop.step(state, window)
        layers = {n.split(".")[2] for n, p in model.named_parameters() if not torch.equal(p.detach(), before[n])}
        trained.append(layers)
    # BAdam 1.4 switches when (steps done + 1) % K == 0: the first block trains K - 1 steps, the others K
    assert trained == [{"1"}, {"0"}, {"0"}, {"1"}, {"1"}]


@pytest.mark.parametrize("optimizer, extra", [
    ("galore_adamw", {"optim_rank": 4, "optim_update_proj_gap": 2}),
    ("apollo_adamw", {"optim_rank": 4, "optim_update_proj_gap": 2}),
    ("adam_mini", {}),
    ("badam", {"badam_switch_every": 3}),
])
def test_resume_from_a_checkpoint_gives_the_uninterrupted_weights(tmp_path: Path, tiny_llama: Path,
                                                                  optimizer: str, extra: dict) -> None:
    sections = {"adapter": {"type": "none"}, "quantization": {"bits": 32},
                "model": {"path": str(tiny_llama), "implementation": "transformers"},
                "train": {"optimizer": optimizer, "max_steps": 6, "save_every": 3, "keep_last": 0, "lr": 1e-3,
                          **extra}}
    for d in ("ref", "resumed"):
        (tmp_path / d).mkdir()
    ref = train(config(write_run_yaml(tmp_path / "ref", tiny_llama, **sections)))
    assert ref.steps == 6
    at3 = [c for c in list_checkpoints(ref.out_dir / "checkpoints") if step_of(c) == 3]
    assert at3
    resumed_dir = tmp_path / "resumed"
    resumed = train(config(write_run_yaml(resumed_dir, tiny_llama, **sections), f"train.resume={at3[0]}"))
    assert resumed.steps == 6
    a, b = load_file(str(ref.out_dir / "model.safetensors")), load_file(str(resumed.out_dir / "model.safetensors"))
    base = load_file(str(tiny_llama / "model.safetensors"))
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], base[k]) for k in a if k in base)  # it trained


@pytest.mark.parametrize("overrides, message", [
    (["train.optimizer=galore_adamw"], "LoRA adapters are low-rank already"),
    (["train.optimizer=adam_mini", "quantization.bits=32"], "is for full fine-tuning"),
    (["train.optimizer=badam", "adapter.type=freeze", "quantization.bits=32"], "use adapter.type none"),
    (["train.optimizer=galore_adamw", "adapter.type=none", "quantization.bits=4"], "needs quantization.bits 16"),
    (["train.optimizer=galore_adamw", "adapter.type=none", "quantization.bits=32", "train.optim_rank=0"],
     "optim_rank must be >= 1"),
    (["train.optimizer=apollo_adamw", "adapter.type=none", "quantization.bits=32", "train.optim_modules=[]"],
     "optim_modules is empty"),
    (["train.optimizer=badam", "adapter.type=none", "quantization.bits=32", "train.badam_switch_every=0"],
     "badam_switch_every must be >= 1"),
])
def test_config_refuses(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(None, ["model.path=demo://llama", *overrides])


def test_galore_with_freeze_and_unmatched_modules(tiny_llama: Path) -> None:
    load_config(None, ["model.path=demo://llama", "train.optimizer=galore_adamw", "adapter.type=freeze",
                       "quantization.bits=32"])  # freeze-tuning with GaLore is fine
    with pytest.raises(ConfigError, match="no trainable 2-D weight lies in a module named"):
        build_loop(tiny_llama, _samples(), *FULL, "train.optimizer=galore_adamw", "train.optim_modules=[attention]",
                   random_adapters=False)
    with pytest.raises(ConfigError, match="train.optim_rank 64 is not below the smaller side of"):
        build_loop(tiny_llama, _samples(), *FULL, "train.optimizer=apollo_adamw", "train.optim_rank=64",
                   random_adapters=False)


@pytest.mark.slow
@pytest.mark.parametrize("optimizer, extra", [
    ("galore_adamw", {"optim_rank": 4, "optim_update_proj_gap": 2}),
    ("badam", {"badam_switch_every": 3}),
])
def test_killed_run_resumes_to_the_uninterrupted_weights(tmp_path: Path, tiny_llama: Path, optimizer: str,
                                                         extra: dict) -> None:
    """kill -9 in step 5 (after the step-3 checkpoint), `train.resume auto`: the final model is the same."""
    sections = {"adapter": {"type": "none"}, "quantization": {"bits": 32},
                "model": {"path": str(tiny_llama), "implementation": "transformers"},
                "train": {"optimizer": optimizer, "max_steps": 6, "save_every": 3, "lr": 1e-3, **extra}}
    for d in ("ref", "killed"):
        (tmp_path / d).mkdir()
    ref = train(config(write_run_yaml(tmp_path / "ref", tiny_llama, **sections)))
    path = write_run_yaml(tmp_path / "killed", tiny_llama, **sections)
    p = run_cli(path, fault="kill@step.backward#5")
    assert p.returncode == -9, p.stderr[-3000:]
    p = run_cli(path)
    assert p.returncode == 0 and "resum" in p.stdout.lower(), p.stderr[-3000:]
    a = load_file(str(ref.out_dir / "model.safetensors"))
    b = load_file(str(tmp_path / "killed" / "out" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_memory_plan_counts_each_optimizers_states() -> None:
    from transformers import AutoConfig

    from loratune.model.memory import estimate

    mc = AutoConfig.for_model("llama", vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                              num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    mats = [(64, 64), (64, 32), (64, 32), (64, 64), (64, 128), (64, 128), (128, 64)]  # q k v o gate up down
    per_layer = sum(i * o for i, o in mats)
    n = 4 * per_layer + 2 * 1000 * 64 + (2 * 4 + 1) * 64

    def plan(optimizer: str, *more: str):
        cfg = load_config(None, ["model.path=unused", "adapter.type=none", "quantization.bits=32",
                                 f"train.optimizer={optimizer}", *more])
        return estimate(cfg, mc, 1, 128, "cpu")

    assert plan("adamw").get("optimizer states").bytes == 8 * n
    low = 4 * sum(2 * 8 * max(i, o) + 8 * min(i, o) for i, o in mats)
    assert plan("galore_adamw", "train.optim_rank=8").get("optimizer states").bytes == 4 * (low + 2 * (n - 4 * per_layer))
    assert plan("apollo_adamw", "train.optim_rank=8").get("optimizer states").bytes == 4 * (low + 2 * (n - 4 * per_layer))
    assert plan("adam_mini").get("optimizer states").bytes == 4 * n
    badam = plan("badam")
    assert badam.get("optimizer states").bytes == 12 * (per_layer + 2 * 64)
    assert badam.get("gradients").bytes == 8 * (per_layer + 2 * 64)


def test_adam_mini_in_one_process_on_a_host_with_several_gpus(tiny_llama: Path, monkeypatch) -> None:
    """adam-mini 1.1.1 counts processes by visible GPUs; one process must not reach for torch.distributed."""
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    loop = build_loop(tiny_llama, _samples(), *FULL, "train.optimizer=adam_mini", "train.batch_size=4",
                      "train.grad_accum=1", "data.max_length=64", "train.batching=padded", random_adapters=False)
    assert loop.optimizer.optimizer.world_size == 1
    assert not loop.step(LoopState(), loop.order(0)[:1]).skipped


def test_galore_with_freeze_tuning_trains_only_the_unfrozen_layer(tiny_llama: Path) -> None:
    loop = build_loop(tiny_llama, _samples(), "adapter.type=freeze", "adapter.freeze_layers=1", "quantization.bits=32",
                      "model.implementation=transformers", "train.optimizer=galore_adamw", "train.optim_rank=4",
                      "train.lr=1e-2", "train.batch_size=4", "train.grad_accum=1", "data.max_length=64",
                      "train.batching=padded", random_adapters=False)
    model = loop.runner.module
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    state, window = LoopState(), loop.order(0)[:1]
    for _ in range(3):
        loop.step(state, window)
    changed = {n for n, p in model.named_parameters() if not torch.equal(p.detach(), before[n])}
    assert changed and all(n.startswith("model.layers.1.") for n in changed)
    projected = loop.optimizer.optimizer.param_groups[0]
    assert projected["name"] == "projected" and len(projected["params"]) == 7  # q k v o gate up down of layer 1


@pytest.mark.parametrize("optimizer, module", [("galore_adamw", "galore_torch"), ("apollo_adamw", "apollo_torch"),
                                               ("adam_mini", "adam_mini"), ("badam", "badam")])
def test_a_missing_package_is_a_config_error_naming_it(tiny_llama: Path, monkeypatch, optimizer: str,
                                                       module: str) -> None:
    monkeypatch.setitem(sys.modules, module, None)  # import raises ImportError
    package = {"galore_torch": "galore-torch", "apollo_torch": "apollo-torch", "adam_mini": "adam-mini",
               "badam": "badam"}[module]
    with pytest.raises(ConfigError, match=f"needs the {package} package .*loratune\\[optim\\]"):
        build_loop(tiny_llama, _samples(), *FULL, f"train.optimizer={optimizer}", random_adapters=False)
