"""What goes into a checkpoint folder and how it comes back: the glue between the run and the formats.

`fill` writes a complete folder (checkpoint.py makes it atomic); `load_weights` and `restore_training`
read one back. The adapter is written in PEFT format (by peft, or by loratune's decoder through
`loratune.decoder.peft_io`), so every checkpoint is a standard PEFT adapter too; the rest is
`trainer_state.safetensors` (optimizer and RNG tensors) and `trainer_state.json` (everything else, with the
model code that trained: a checkpoint resumes only on the same one). See state.py for why nothing is pickled.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from loratune.config import Config, to_dict
from loratune.errors import LoratuneError
from loratune.model.build import TrainModel
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

    model: TrainModel  # the model being trained (its module is not accelerate's wrapper)
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
        "implementation": parts.model.resolved.implementation, "versions": library_versions(),
    }
    (folder / STATE_JSON).write_text(json.dumps(meta, indent=1), encoding="utf-8")


def read_meta(folder: Path) -> dict:
    meta = json.loads((folder / STATE_JSON).read_text(encoding="utf-8"))
    if meta.get("format") != STATE_FORMAT:
        raise LoratuneError(f"{folder}: training state format {meta.get('format')!r}, expected {STATE_FORMAT}")
    return meta


def load_weights(model: TrainModel, folder: Path) -> None:
    """Load the trainable weights saved in `folder` into `model`, exactly."""
    model.load_weights(folder)


def restore_training(folder: Path, meta: dict, parts: Parts) -> LoopState:
    """Weights, optimizer, scheduler, scaler and RNG back from `folder`; returns where training stood.

    The RNG is restored last, so nothing done afterwards before the next step can consume it.
    """
    saved = meta.get("implementation", "transformers")  # (checkpoints from before loratune's decoder)
    if saved != parts.model.resolved.implementation:
        raise LoratuneError(f"{folder} was trained by the {saved} model code, this run resolved "
                            f"{parts.model.resolved.implementation}: its optimizer state does not transfer; set "
                            f"model.implementation={saved} to resume it")
    tensors = load_file(str(folder / STATE_TENSORS))
    load_weights(parts.model, folder)
    load_optimizer_state(parts.optimizer, tensors, meta["optimizer"])
    load_scheduler_state(parts.scheduler, meta["scheduler"])
    load_scaler_state(parts.scaler, meta["scaler"])
    known = {f.name for f in dataclasses.fields(LoopState)}
    state = LoopState(**{k: v for k, v in meta["loop"].items() if k in known})
    load_rng_state(tensors, meta["rng"])
    return state
