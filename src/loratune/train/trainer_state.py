"""A checkpoint's trainer state (optimizer, scheduler, loss scaler, every RNG) as tensors plus JSON, and back.

Nothing is pickled: tensors go to a safetensors file and everything else to JSON, so loading a
checkpoint can never run code. Each `*_state` function returns `(tensors, meta)`; the matching `load_*`
takes them back. Restoring is bit-exact: the tensors are copied, not recomputed.

bitsandbytes optimizers keep their state in buffers they allocate themselves (paged buffers on a GPU,
which the driver can evict to host memory). Loading through `load_state_dict` would replace those with
plain device tensors and silently turn paging off, so for them the buffers are created by the
optimizer's own `init_state` and the saved values are copied into them in place.
"""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch

Tensors = dict[str, torch.Tensor]
_BNB_WRAPPED = "__bnb_optimizer_quant_state__"  # bitsandbytes nests its quantization tensors under this key


class StateError(RuntimeError):
    """A saved state does not fit the optimizer it is loaded into."""


def inner_optimizer(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """The real optimizer under accelerate's wrapper."""
    while hasattr(optimizer, "optimizer") and isinstance(optimizer.optimizer, torch.optim.Optimizer):
        optimizer = optimizer.optimizer
    return optimizer


def _is_bnb(optimizer: torch.optim.Optimizer) -> bool:
    return hasattr(optimizer, "init_state") and hasattr(optimizer, "non_castable_tensor_keys")


def _plain(value: Any) -> Any:
    """JSON-safe copy of a param-group value (tuples become lists)."""
    return list(value) if isinstance(value, tuple) else value


def optimizer_state(optimizer: torch.optim.Optimizer) -> tuple[Tensors, dict]:
    """Every state tensor under `optimizer.{param index}.{key}`; group settings and scalars in meta."""
    opt = inner_optimizer(optimizer)
    return state_dict_tensors(opt.state_dict(), type(opt).__name__)


def state_dict_tensors(sd: dict, class_name: str) -> tuple[Tensors, dict]:
    """`optimizer_state` of an optimizer state dict (by parameter index) of the optimizer class `class_name`
    (also for one gathered from shards: `loratune.train.fsdp`)."""
    tensors: Tensors = {}
    state: dict[str, dict] = {}
    for idx, entry in sd["state"].items():
        flat = dict(entry)
        flat.update(flat.pop(_BNB_WRAPPED, {}))
        scalars = {}
        for key, value in flat.items():
            if isinstance(value, torch.Tensor):
                # copies: safetensors refuses tensors that share memory (bnb shares its quantile maps)
                tensors[f"optimizer.{idx}.{key}"] = value.detach().to("cpu", copy=True).contiguous()
            else:
                scalars[key] = value
        state[str(idx)] = scalars
    groups = [{k: _plain(v) for k, v in g.items()} for g in sd["param_groups"]]
    return tensors, {"class": class_name, "param_groups": groups, "state": state}


def saved_entries(tensors: Tensors, meta: dict) -> dict[int, dict[str, Any]]:
    """{param index: {key: saved value}} of a state `optimizer_state` wrote."""
    entries: dict[int, dict[str, Any]] = {int(i): dict(s) for i, s in meta["state"].items()}
    for name, value in tensors.items():
        if name.startswith("optimizer."):
            _, idx, key = name.split(".", 2)
            entries.setdefault(int(idx), {})[key] = value
    return entries


def _restore_groups(opt: torch.optim.Optimizer, saved: list[dict]) -> None:
    if len(saved) != len(opt.param_groups) or any(
            len(s["params"]) != len(g["params"]) for s, g in zip(saved, opt.param_groups)):
        raise StateError("the saved optimizer state has different parameter groups than this model's "
                         f"({[len(s['params']) for s in saved]} vs {[len(g['params']) for g in opt.param_groups]} "
                         "parameters per group): was the adapter or LoRA+ setting changed?")
    for group, s in zip(opt.param_groups, saved):
        for key, value in s.items():
            if key != "params":
                group[key] = tuple(value) if key == "betas" else value


def load_optimizer_state(optimizer: torch.optim.Optimizer, tensors: Tensors, meta: dict) -> None:
    """Put a saved state back into a freshly built optimizer of the same class and parameters."""
    opt = inner_optimizer(optimizer)
    if meta["class"] != type(opt).__name__:
        raise StateError(f"the checkpoint's optimizer is {meta['class']}, this run's is {type(opt).__name__}")
    entries = saved_entries(tensors, meta)
    _restore_groups(opt, meta["param_groups"])
    if not _is_bnb(opt):
        opt.load_state_dict({"state": entries, "param_groups": meta["param_groups"]})
        _restore_groups(opt, meta["param_groups"])  # load_state_dict may normalise types; keep the saved ones
        return
    index = 0
    for gi, group in enumerate(opt.param_groups):
        for pi, p in enumerate(group["params"]):
            saved = entries.get(index)
            index += 1
            if saved is None:
                continue
            if not opt.state[p]:
                opt.init_state(group, p, gi, pi)  # the optimizer's own (possibly paged) buffers
            live = opt.state[p]
            for key, value in saved.items():
                if isinstance(value, torch.Tensor):
                    cur = live.get(key)
                    if isinstance(cur, torch.Tensor) and cur.shape == value.shape and cur.dtype == value.dtype:
                        cur.copy_(value)
                    else:
                        live[key] = value.to(p.device)
                else:
                    live[key] = value


def scheduler_state(scheduler: torch.optim.lr_scheduler.LRScheduler) -> dict:
    return {k: v for k, v in scheduler.state_dict().items() if k != "lr_lambdas"}


def load_scheduler_state(scheduler: torch.optim.lr_scheduler.LRScheduler, meta: dict) -> None:
    scheduler.load_state_dict({**meta, "lr_lambdas": [None] * len(scheduler.optimizer.param_groups)})


def scaler_state(scaler: torch.amp.GradScaler | None) -> dict:
    return dict(scaler.state_dict()) if scaler is not None and scaler.is_enabled() else {}


def load_scaler_state(scaler: torch.amp.GradScaler | None, meta: dict) -> None:
    if scaler is not None and meta:
        scaler.load_state_dict(meta)


def rng_state() -> tuple[Tensors, dict]:
    """Python, numpy, torch CPU and every CUDA device's generator."""
    tensors: Tensors = {"rng.torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = s
    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    meta = {"python": [version, list(internal), gauss],
            "numpy": [name, keys.tolist(), int(pos), int(has_gauss), float(cached)]}
    return tensors, meta


def load_rng_state(tensors: Tensors, meta: dict) -> None:
    version, internal, gauss = meta["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = meta["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(tensors["rng.torch"])
    cuda = [tensors[k] for k in sorted((k for k in tensors if k.startswith("rng.cuda.")), key=lambda k: int(k[9:]))]
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)


def all_finite(tensors: Tensors) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in tensors.values() if t.is_floating_point())
