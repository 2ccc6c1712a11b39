"""What goes into a checkpoint folder and how it comes back: the glue between the run and the formats.

`fill` writes a complete folder (checkpoint.py makes it atomic); `load_weights` and `restore_training`
read one back. The adapter is written by peft (`save_pretrained`, safetensors), so every checkpoint is a
standard PEFT adapter too; the rest is `trainer_state.safetensors` (optimizer and RNG tensors) and
`trainer_state.json` (everything else). See state.py for why nothing is pickled.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import set_peft_model_state_dict
from safetensors.torch import load_file, save_file
from torch import nn

from loratune.config import Config, to_dict
from loratune.errors import LoratuneError
from loratune.model.adapters import is_peft
from loratune.train.artifacts import NonFiniteWeights, library_versions, save_run
from loratune.train.loop import LoopState
from loratune.train.resume import config_hash
from loratune.train.state import (all_finite, load_optimizer_state, load_rng_state, load_scaler_state,
                                  load_scheduler_state, optimizer_state, rng_state, scaler_state, scheduler_state)

STATE_JSON = "trainer_state.json"
STATE_TENSORS = "trainer_state.safetensors"
STATE_FORMAT = 1


@dataclass
class Parts:
    """The live objects a checkpoint captures."""

    model: nn.Module  # the PeftModel (or the full model), not accelerate's wrapper
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler | None
    tokenizer: object
    template: object
    info: object


def fill(folder: Path, parts: Parts, state: LoopState, cfg: Config, fingerprints: dict[str, str],
         run_facts: dict, card: str | None = None) -> None:
    """Write the adapter, tokenizer, model card, config and full training state into `folder`."""
    save_run(folder, parts.model, parts.tokenizer, parts.template, parts.info, cfg, extra=run_facts, card=card)
    opt_tensors, opt_meta = optimizer_state(parts.optimizer)
    if not all_finite(opt_tensors):
        raise NonFiniteWeights("refusing to save: the optimizer state contains NaN or inf")
    rng_tensors, rng_meta = rng_state()
    save_file({**opt_tensors, **rng_tensors}, str(folder / STATE_TENSORS), metadata={"format": "loratune"})
    meta = {
        "format": STATE_FORMAT, "step": state.step, "total_steps": run_facts.get("total_steps"),
        "loop": dataclasses.asdict(state),
        "optimizer": opt_meta, "scheduler": scheduler_state(parts.scheduler), "scaler": scaler_state(parts.scaler),
        "rng": rng_meta, "config": to_dict(cfg), "config_hash": config_hash(cfg), "data": fingerprints,
        "versions": library_versions(),
    }
    (folder / STATE_JSON).write_text(json.dumps(meta, indent=1), encoding="utf-8")


def read_meta(folder: Path) -> dict:
    meta = json.loads((folder / STATE_JSON).read_text(encoding="utf-8"))
    if meta.get("format") != STATE_FORMAT:
        raise LoratuneError(f"{folder}: training state format {meta.get('format')!r}, expected {STATE_FORMAT}")
    return meta


def load_weights(model: nn.Module, folder: Path) -> None:
    """Load the trainable weights saved in `folder` into `model`, exactly."""
    if is_peft(model):
        result = set_peft_model_state_dict(model, load_file(str(folder / "adapter_model.safetensors")))
        if result.unexpected_keys:
            raise LoratuneError(f"{folder}: the adapter does not fit this model (unexpected weights such as "
                                f"{result.unexpected_keys[0]}); was adapter.* changed?")
        return
    state = {}
    for f in sorted(folder.glob("model*.safetensors")):
        state.update(load_file(str(f)))
    missing, unexpected = model.load_state_dict(state, strict=False)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    if unexpected or any(k in trainable for k in missing if k not in _tied(model)):
        raise LoratuneError(f"{folder}: the saved weights do not fit this model")


def _tied(model: nn.Module) -> set[str]:
    """Names of weights saved once under another name (e.g. a tied output head)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if head is not None and emb is not None and head.weight is emb.weight:
        return {n for n, p in model.named_parameters(remove_duplicate=False) if p is head.weight}
    return set()


def restore_training(folder: Path, meta: dict, parts: Parts) -> LoopState:
    """Weights, optimizer, scheduler, scaler and RNG back from `folder`; returns where training stood.

    The RNG is restored last, so nothing done afterwards before the next step can consume it.
    """
    tensors = load_file(str(folder / STATE_TENSORS))
    load_weights(parts.model, folder)
    load_optimizer_state(parts.optimizer, tensors, meta["optimizer"])
    load_scheduler_state(parts.scheduler, meta["scheduler"])
    load_scaler_state(parts.scaler, meta["scaler"])
    known = {f.name for f in dataclasses.fields(LoopState)}
    state = LoopState(**{k: v for k, v in meta["loop"].items() if k in known})
    load_rng_state(tensors, meta["rng"])
    return state
