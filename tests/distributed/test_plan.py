"""`loratune plan --gpus N`: DDP is a full copy per GPU plus the gradient all-reduce buffer; FSDP divides the
weights, adapters, gradients and optimizer states by N and adds the gathered layers."""

from __future__ import annotations

import math
from pathlib import Path

from loratune.cli import main
from loratune.config import load_config
from loratune.model.memory import Shape, estimate
from loratune.model.parallel_plan import SHARDED, choose, per_gpu

QUICKSTART = str(Path(__file__).parents[2] / "examples" / "quickstart.yaml")
# Llama-3-8B's shape (as tests/model/test_memory.py)
SHAPE = Shape(vocab=128256, hidden=4096, intermediate=14336, layers=32, heads=32, kv_heads=8, head_dim=128,
              tied=False)


def _plan():
    cfg = load_config(None, ["model.path=unused", "quantization.compute_dtype=bf16", "adapter.rank=16",
                             "train.optimizer=adamw"])
    return estimate(cfg, SHAPE, 2, 2048, "cuda", embed_on_host=False, fused_mlp=True)


def test_ddp_is_a_full_copy_plus_the_gradient_buffer() -> None:
    one = _plan()
    ddp = per_gpu(one, SHAPE, 4, "ddp")
    grads = one.get("gradients").bytes
    assert ddp.total == one.total + grads
    assert ddp.get("gradient all-reduce buffer").bytes == grads
    assert per_gpu(one, SHAPE, 1, "ddp") is one


def test_fsdp_shards_the_states_and_gathers_two_layers() -> None:
    one = _plan()
    fsdp = per_gpu(one, SHAPE, 8, "fsdp")
    for name in SHARDED:
        assert fsdp.get(name).bytes == math.ceil(one.get(name).bytes / 8)
    layer = (one.get("decoder weights").bytes + one.get("quantization constants").bytes) // 32
    emb = one.get("embedding").bytes
    assert fsdp.get("gathered weights").bytes == 2 * layer + emb
    assert fsdp.get("saved activations").bytes == one.get("saved activations").bytes  # not sharded
    sharded = sum(one.get(n).bytes for n in SHARDED)
    assert fsdp.total < one.total - sharded * 7 // 8 + 2 * layer + emb + 8 * len(SHARDED)
    plans = {"ddp": per_gpu(one, SHAPE, 8, "ddp"), "fsdp": fsdp}
    assert choose(plans, None) == "ddp"
    assert choose(plans, plans["ddp"].total) == "ddp"
    assert choose(plans, plans["ddp"].total - 1) == "fsdp"


def test_cli_plans_per_gpu(capsys) -> None:
    assert main(["plan", QUICKSTART, "--device", "cuda", "--budget-gib", "80", "--gpus", "2"]) == 0
    out = capsys.readouterr().out
    assert "2 GPUs: a step trains on 4 x 1 (grad_accum) x 2 samples" in out
    assert "per GPU, ddp:" in out and "per GPU, fsdp:" in out
    assert "train.strategy auto would pick: ddp" in out
    assert main(["plan", QUICKSTART, "--device", "cuda", "--budget-gib", "0.0001", "--gpus", "2"]) == 2


def test_auto_picks_fsdp_only_when_one_gpu_does_not_fit(tiny_llama: Path) -> None:
    """train.strategy auto on the tiny model's real plan: ddp while one process's plan fits the budget, fsdp when
    only the sharded plan fits (the per-GPU fsdp plan then is the run's plan), ddp with one process."""
    from loratune.model.memory import load_model_config, plan_run
    from loratune.model.parallel_plan import choose_strategy, fsdp_run_plan

    cfg = load_config(None, [f"model.path={tiny_llama}", "train.batch_size=2", "data.max_length=128"])
    one = plan_run(cfg, device="cpu", budget=1 << 40).plan
    shape = Shape.from_config(load_model_config(cfg))
    sharded = per_gpu(one, shape, 2, "fsdp")
    assert sharded.total < one.total
    between = (sharded.total + one.total) // 2
    assert choose_strategy(cfg, 2, budget=one.total) == "ddp"
    assert choose_strategy(cfg, 2, budget=between) == "fsdp"
    assert choose_strategy(cfg, 1, budget=between) == "ddp"
    rp = fsdp_run_plan(cfg, 2, budget=between)
    assert rp is not None and rp.plan.total == sharded.total and rp.cfg.train.batch_size == 2
    assert fsdp_run_plan(cfg, 2, budget=sharded.total - 1) is None
