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
         (the larger of the two); activations are not sharded. Training with fsdp is not available yet
         (docs/multi-gpu.md): this plan says what it would buy.

Which strategy `auto` picks: ddp when its per-GPU plan fits the budget, else fsdp.
"""

from __future__ import annotations

import dataclasses
import math

from loratune.config import Config
from loratune.model.memory import (Component, MemoryPlan, Shape, WouldNotFit, _size, device_budget, load_model_config,
                                   render)

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
        note = " (not available for training yet: docs/multi-gpu.md)" if name == "fsdp" else ""
        print(render(p, f"per GPU, {name}{note}: {_size(p.total)}{fits}"))
    fitting = [s for s in ("ddp", "fsdp") if budget is None or plans[s].total <= budget]
    if not fitting:
        raise error or WouldNotFit(f"this run would not fit {gpus} GPUs with either strategy: per GPU ddp "
                                   f"{_size(plans['ddp'].total)}, fsdp {_size(plans['fsdp'].total)} > "
                                   f"{_size(budget)} free", plans["fsdp"])
    print(f"train.strategy auto would pick: {choose(plans, budget)}")
