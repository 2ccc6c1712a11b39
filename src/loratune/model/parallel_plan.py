"""The memory plan per GPU when N GPUs train together: `loratune plan --gpus N`.

Built on the one-GPU plan (`loratune.model.memory.plan_for`), component by component:

  ddp    every GPU holds a full copy: the one-GPU plan unchanged (the same micro-batch on each), plus the
         flat buffer the loop's gradient all-reduce concatenates the trainable gradients into
         (`loratune.train.distributed.World.sum_grads`): trainable parameters x 4 bytes. It lives after the
         window's backward passes, when the activations are gone; it is counted anyway (small for LoRA, on
         the safe side).
  fsdp   FSDP2 shards (`torch.distributed.fsdp.fully_shard`, one unit per decoder layer): the weights, the
         quantization constants, embedding, head, norms, adapters, gradients and optimizer states are
         divided by N (rounded up); each GPU gathers the full weights of the layer it computes and
         prefetches the next (2 x one layer's weights and constants), and the embedding or head in use
         (the larger of the two); activations are not sharded (`loratune.train.fsdp` trains it).

Which strategy `auto` picks: ddp when its per-GPU plan fits the budget, else fsdp.
"""

from __future__ import annotations

import dataclasses
import math

from loratune.config import Config
from loratune.model.memory import (Component, MemoryPlan, RunPlan, Shape, WouldNotFit, _size, device_budget,
                                   load_model_config, render)

SHARDED = ("decoder weights", "quantization constants", "embedding", "output head", "norms and biases",
           "adapter weights", "gradients", "optimizer states")


def per_gpu(plan: MemoryPlan, shape: Shape, gpus: int, strategy: str) -> MemoryPlan:
    """The plan of one GPU out of `gpus` training together with `strategy` ("ddp" or "fsdp")."""
    if gpus < 1:
        raise ValueError(f"gpus must be >= 1, got {gpus}")
    names = {c.name: c for c in plan.components}
    if strategy == "ddp":
        grads = names.get("gradients")
        if gpus == 1 or grads is None:
            return plan
        buffer = Component("gradient all-reduce buffer", grads.bytes,
                           f"the trainable gradients in one flat buffer, summed over {gpus} GPUs once per step")
        return _with(plan, [*plan.components, buffer])
    if strategy != "fsdp":
        raise ValueError(f"strategy must be ddp or fsdp, got {strategy!r}")
    comps = []
    for c in plan.components:
        if c.name in SHARDED and c.bytes:
            comps.append(dataclasses.replace(c, bytes=math.ceil(c.bytes / gpus),
                                             detail=f"1/{gpus} shard of {c.detail}"))
        else:
            comps.append(c)
    layer = sum(names[n].bytes for n in ("decoder weights", "quantization constants") if n in names) // shape.layers
    edge = max(names["embedding"].bytes if "embedding" in names else 0,
               names["output head"].bytes if "output head" in names else 0)
    comps.append(Component("gathered weights", 2 * layer + edge,
                           "the layer being computed and the next one prefetched, whole, and the embedding or head"))
    return _with(plan, comps)


def choose(plans: dict[str, MemoryPlan], budget: int | None) -> str:
    """train.strategy auto from the plans: ddp when it fits (or no budget is known), else fsdp."""
    if budget is None or plans["ddp"].total <= budget:
        return "ddp"
    return "fsdp"


def _with(plan: MemoryPlan, components: list[Component]) -> MemoryPlan:
    return dataclasses.replace(plan, components=tuple(components))


def print_per_gpu(cfg: Config, plan: MemoryPlan, gpus: int, strategy: str, budget: int | None,
                  error: WouldNotFit | None = None) -> None:
    """`loratune plan --gpus N`: each strategy's per-GPU table after the one-GPU plan, and which `auto` picks;
    raises `WouldNotFit` (the CLI exits 2) when no strategy fits `budget` per GPU."""
    if budget is None:
        budget = device_budget(plan.device)
    shape = Shape.from_config(load_model_config(cfg))
    plans = {s: per_gpu(plan, shape, gpus, s) for s in ("ddp", "fsdp")}
    t = cfg.train
    batch = t.batch_size if t.batch_size != "auto" else "batch_size"
    print(f"\n{gpus} GPUs: a step trains on {batch} x {t.grad_accum} (grad_accum) x {gpus} samples; per GPU:")
    for name in ("ddp", "fsdp") if strategy == "both" else (strategy,):
        p = plans[name]
        fits = "" if budget is None else (" fits" if p.total <= budget else f" does NOT fit {_size(budget)} free")
        print(render(p, f"per GPU, {name}: {_size(p.total)}{fits}"))
    fitting = [s for s in ("ddp", "fsdp") if budget is None or plans[s].total <= budget]
    if not fitting:
        raise error or WouldNotFit(f"this run would not fit {gpus} GPUs with either strategy: per GPU ddp "
                                   f"{_size(plans['ddp'].total)}, fsdp {_size(plans['fsdp'].total)} > "
                                   f"{_size(budget)} free", plans["fsdp"])
    print(f"train.strategy auto would pick: {choose(plans, budget)}")


def fsdp_run_plan(cfg: Config, gpus: int, saved_batch_size: int | None = None,
                  budget: int | None = None) -> RunPlan | None:
    """The run's plan (`plan_run`'s) when it trains with fsdp over `gpus` GPUs and ONE GPU's plan does not fit:
    the per-GPU fsdp plan must fit `budget` (default: the free memory). train.batch_size auto: the largest
    micro-batch up to 8 whose per-GPU plan fits; None when none does."""
    from loratune.model.memory import plan_run

    t = cfg.train
    sizes = [t.batch_size] if t.batch_size != "auto" else [saved_batch_size] if saved_batch_size else range(8, 0, -1)
    shape = Shape.from_config(load_model_config(cfg))
    for b in sizes:
        sized = dataclasses.replace(cfg, train=dataclasses.replace(t, batch_size=b))
        rp = plan_run(sized, budget=1 << 62)  # one GPU's plan, unbounded: the per-GPU plan is checked below
        limit = device_budget(rp.plan.device) if budget is None else budget
        mine = per_gpu(rp.plan, shape, gpus, "fsdp")
        if limit is None or mine.total <= limit:
            how = "set in the config" if t.batch_size != "auto" else "auto: the largest whose fsdp plan fits"
            note = f"{b} ({how}); per GPU with fsdp over {gpus}: {_size(mine.total)}" + (
                "" if limit is None else f" of {_size(limit)} free")
            return dataclasses.replace(rp, plan=mine, budget=limit, note=note)
    return None


def choose_strategy(cfg: Config, gpus: int, saved_batch_size: int | None = None, budget: int | None = None) -> str:
    """train.strategy auto for a run on `gpus` processes: ddp when one GPU's plan (a full 4-bit copy and the
    activations) fits, fsdp when only the sharded plan fits; ddp also when no plan can be made (an unknown
    model: nothing to shard by) or neither fits (the one-GPU error then says why)."""
    from loratune.errors import ConfigError, ModelError
    from loratune.model.memory import plan_run

    if gpus < 2:
        return "ddp"
    try:
        plan_run(cfg, budget=budget, saved_batch_size=saved_batch_size)
        return "ddp"
    except WouldNotFit:
        return "fsdp" if fsdp_run_plan(cfg, gpus, saved_batch_size, budget) is not None else "ddp"
    except (ModelError, ConfigError):
        return "ddp"
