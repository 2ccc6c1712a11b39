"""A checkpoint folder: what it holds, how it is written atomically and verified, and how it is read back.

    OUT/checkpoints/step-00000200/
        adapter_config.json, adapter_model.safetensors   standard PEFT adapter
        tokenizer files, chat_template.jinja, loratune.yaml, loratune_run.json, README.md   (a usable run
                                    folder: run_folder.py writes them, so `loratune chat` works on a checkpoint)
        trainer_state.safetensors   optimizer tensors, RNG states (trainer_state.py: nothing is pickled)
        trainer_state.json          loop position, scheduler, scaler, RNG, config hash, data fingerprints, the
                                    model code that trained (a checkpoint resumes only on the same one), eval history
        manifest.json               size and SHA-256 of every file above; written last

`fill` writes a folder's contents; `read_meta` and `restore_training` read them back (weights, optimizer,
scheduler, scaler, loop position, RNG: exactly). Whether and from which checkpoint a run resumes is
resume.py's decision.

Writing (`write_checkpoint`): everything goes into a hidden `.tmp-*` folder; each file is fsynced; the
manifest is written and fsynced last; the folder is renamed into place (atomic on POSIX) and the parent
fsynced. Older checkpoints are rotated only after that, by renaming them to `.trash-*` first, so a
half-deleted folder never looks like a checkpoint. A process killed at any instant therefore leaves either
the previous set of checkpoints or the new one, plus hidden leftovers that `clean_leftovers` removes.

Reading: a checkpoint counts only if its manifest parses and every file matches its size and hash;
`complete_checkpoints` says why it skips each one that does not.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from loratune.config import Config, to_dict
from loratune.errors import LoratuneError
from loratune.model.build import TrainModel
from loratune.train.loop import LoopState
from loratune.train.run_folder import NonFiniteWeights, library_versions, save_run, write_json_atomic
from loratune.train.trainer_state import (all_finite, load_optimizer_state, load_rng_state, load_scaler_state,
                                          load_scheduler_state, optimizer_state, rng_state, scaler_state,
                                          scheduler_state)

log = logging.getLogger("loratune.train")

CHECKPOINTS = "checkpoints"
MANIFEST = "manifest.json"
FORMAT = 1
STATE_JSON = "trainer_state.json"
STATE_TENSORS = "trainer_state.safetensors"
STATE_FORMAT = 1
_NAME = re.compile(r"^step-(\d{8,})$")


def checkpoint_name(step: int) -> str:
    return f"step-{step:08d}"


def step_of(folder: Path) -> int:
    m = _NAME.match(folder.name)
    if not m:
        raise ValueError(f"{folder} is not a checkpoint folder name")
    return int(m.group(1))


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _fsync_file(path: Path) -> None:
    with path.open("rb") as f:
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST)


def write_checkpoint(root: Path, step: int, fill: Callable[[Path], None],
                     fault: Callable[[str], object] = lambda point: None) -> Path:
    """Create `root/step-NNNNNNNN` atomically: `fill(tmp_folder)` writes the files, this makes it durable."""
    root.mkdir(parents=True, exist_ok=True)
    final = root / checkpoint_name(step)
    tmp = root / f".tmp-{final.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        fill(tmp)
        files = _files(tmp)
        for f in files:
            _fsync_file(f)
        fault("save.files")
        manifest = {"format": FORMAT, "step": step,
                    "files": {f.relative_to(tmp).as_posix(): {"bytes": f.stat().st_size, "sha256": _sha256(f)}
                              for f in files}}
        write_json_atomic(tmp / MANIFEST, manifest)
        _fsync_dir(tmp)
        fault("save.manifest")
        if final.exists():  # a stale copy of this step (e.g. from before a resume): move it aside first
            trash(final)
        os.rename(tmp, final)
        _fsync_dir(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    fault("save.renamed")
    return final


def verify(folder: Path) -> str | None:
    """None if `folder` is a complete checkpoint, else the reason it is not."""
    manifest_path = folder / MANIFEST
    if not manifest_path.is_file():
        return "no manifest (the save did not finish)"
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        files = manifest["files"]
    except (ValueError, KeyError, TypeError) as e:
        return f"unreadable manifest ({e})"
    if manifest.get("format") != FORMAT:
        return f"manifest format {manifest.get('format')!r}, expected {FORMAT}"
    for name, want in files.items():
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != want["bytes"]:
            return f"{name} has {path.stat().st_size} bytes, the manifest says {want['bytes']}"
        if _sha256(path) != want["sha256"]:
            return f"{name} does not match its checksum"
    return None


def list_checkpoints(root: Path) -> list[Path]:
    """Checkpoint folders under `root`, newest first, without checking them."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and _NAME.match(p.name)]
    return sorted(found, key=step_of, reverse=True)


def complete_checkpoints(root: Path, say: Callable[[str], None] = log.warning) -> list[Path]:
    """Verified checkpoints under `root`, newest first; each one skipped is reported through `say`."""
    good = []
    for folder in list_checkpoints(root):
        reason = verify(folder)
        if reason is None:
            good.append(folder)
        else:
            say(f"skipping checkpoint {folder}: {reason}")
    return good


def trash(folder: Path) -> None:
    """Delete a folder so that no half-deleted copy ever carries its name: rename first, then remove."""
    doomed = folder.with_name(f".trash-{folder.name}-{os.getpid()}")
    shutil.rmtree(doomed, ignore_errors=True)
    os.rename(folder, doomed)
    shutil.rmtree(doomed, ignore_errors=True)


def rotate(root: Path, keep_last: int, protect: set[Path] = frozenset()) -> list[Path]:
    """Delete all but the newest `keep_last` checkpoints (0 keeps all), never those in `protect`."""
    if keep_last <= 0:
        return []
    removed = []
    for folder in list_checkpoints(root)[keep_last:]:
        if folder.resolve() not in {p.resolve() for p in protect}:
            trash(folder)
            removed.append(folder)
    return removed


def clean_leftovers(root: Path) -> None:
    """Remove temporary and half-deleted folders left by a process that was killed."""
    if root.is_dir():
        for p in root.iterdir():
            if p.name.startswith((".tmp-", ".trash-")):
                shutil.rmtree(p, ignore_errors=True)


# What a checkpoint holds, and reading it back.
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
    # train.strategy fsdp: the sharded model's checkpoint I/O (`loratune.train.fsdp.ShardedState`), else None
    sharding: object | None = None


def fill(folder: Path, parts: Parts, state: LoopState, cfg: Config, fingerprints: dict[str, str],
         run_facts: dict, *, config_hash: str, card: str | None = None) -> None:
    """Write the adapter, tokenizer, model card, config and full training state into `folder`.

    `config_hash` and `fingerprints` (of the data splits) identify the run (resume.config_hash,
    resume.data_fingerprint)."""
    save_run(folder, parts.model, parts.tokenizer, parts.template, parts.info, cfg, extra=run_facts, card=card)
    opt_tensors, opt_meta = (parts.sharding.optimizer_state() if parts.sharding is not None
                             else optimizer_state(parts.optimizer))
    if not all_finite(opt_tensors):
        raise NonFiniteWeights("refusing to save: the optimizer state contains NaN or inf")
    rng_tensors, rng_meta = rng_state()
    save_file({**opt_tensors, **rng_tensors}, str(folder / STATE_TENSORS), metadata={"format": "loratune"})
    meta = {
        "format": STATE_FORMAT, "step": state.step, "total_steps": run_facts.get("total_steps"),
        "loop": dataclasses.asdict(state),
        "optimizer": opt_meta, "scheduler": scheduler_state(parts.scheduler), "scaler": scaler_state(parts.scaler),
        "rng": rng_meta, "config": to_dict(cfg), "config_hash": config_hash, "data": fingerprints,
        "implementation": parts.model.resolved.implementation, "versions": library_versions(),
    }
    (folder / STATE_JSON).write_text(json.dumps(meta, indent=1), encoding="utf-8")


def read_meta(folder: Path) -> dict:
    meta = json.loads((folder / STATE_JSON).read_text(encoding="utf-8"))
    if meta.get("format") != STATE_FORMAT:
        raise LoratuneError(f"{folder}: training state format {meta.get('format')!r}, expected {STATE_FORMAT}")
    return meta


def load_weights(model: TrainModel, folder: Path, sharding: object | None = None) -> None:
    """Load the trainable weights saved in `folder` into `model` (or its shards: `sharding`), exactly."""
    if sharding is not None:
        sharding.load_weights(folder)
    else:
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
    load_weights(parts.model, folder, parts.sharding)
    if parts.sharding is not None:
        parts.sharding.load_optimizer(tensors, meta["optimizer"])
    else:
        load_optimizer_state(parts.optimizer, tensors, meta["optimizer"])
    load_scheduler_state(parts.scheduler, meta["scheduler"])
    load_scaler_state(parts.scaler, meta["scaler"])
    known = {f.name for f in dataclasses.fields(LoopState)}
    state = LoopState(**{k: v for k, v in meta["loop"].items() if k in known})
    load_rng_state(tensors, meta["rng"])
    return state
