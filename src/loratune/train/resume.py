"""Deciding where a run starts, and refusing to resume into a different run.

`train.resume`:
    auto   an unfinished run in output.dir continues from its newest complete checkpoint; a finished
           one is replaced only with output.overwrite; otherwise training starts from step 0
    off    always start from step 0 (a previous run in output.dir needs output.overwrite)
    PATH   continue from that checkpoint folder, or from the newest complete one of that run folder

A checkpoint records a hash of the config and a fingerprint of the training data. Resuming with a
different config or data is refused with the list of what changed, unless train.allow_config_change.
Keys that cannot change the trained weights (logging, checkpoint cadence, output location, sample
prompts) are left out of the comparison.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from loratune.config import Config, to_dict
from loratune.errors import ConfigError, LoratuneError
from loratune.train.artifacts import RUN_FILE
from loratune.train.checkpoint import CHECKPOINTS, complete_checkpoints, list_checkpoints, step_of, trash, verify

log = logging.getLogger("loratune.train")


# Keys whose change cannot change the weights a run produces: not part of the comparison.
BOOKKEEPING = frozenset({
    "train.resume", "train.allow_config_change", "train.log_every", "train.tensorboard", "train.plot",
    "train.save_every", "train.keep_last", "output.dir", "output.overwrite", "output.sample_prompts",
    "output.sample_max_new_tokens", "data.num_proc", "data.cache",
})
RUN_OUTPUTS = ("metrics.jsonl", "loss.png", "tensorboard", "samples.json", CHECKPOINTS)


class ResumeError(LoratuneError):
    """The run cannot continue from the checkpoint asked for."""


def flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    """{'a': {'b': 1}, 'l': [{'c': 2}]} -> {'a.b': 1, 'l.0.c': 2}."""
    if isinstance(data, dict):
        out: dict[str, Any] = {}
        for k, v in data.items():
            out.update(flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    if isinstance(data, list) and data and all(isinstance(v, dict) for v in data):
        out = {}
        for i, v in enumerate(data):
            out.update(flatten(v, f"{prefix}.{i}"))
        return out
    return {prefix: data}


def comparable(cfg: Config | dict) -> dict[str, Any]:
    """The flattened config without bookkeeping keys: what must match to resume."""
    flat = flatten(to_dict(cfg) if not isinstance(cfg, dict) else cfg)
    return {k: v for k, v in flat.items() if k not in BOOKKEEPING}


def config_hash(cfg: Config | dict) -> str:
    return hashlib.sha256(json.dumps(comparable(cfg), sort_keys=True).encode()).hexdigest()


def config_diff(old: dict, new: dict) -> list[str]:
    """Readable lines `key: old -> new` for every comparable key that differs."""
    a, b = comparable(old), comparable(new)
    missing = object()
    lines = []
    for key in sorted(set(a) | set(b)):
        va, vb = a.get(key, missing), b.get(key, missing)
        if va != vb:
            show = lambda v: "(absent)" if v is missing else json.dumps(v)  # noqa: E731
            lines.append(f"  {key}: {show(va)} -> {show(vb)}")
    return lines


def data_fingerprint(samples: list) -> str:
    """SHA-256 over every sample's token ids, labels and positions, in order."""
    h = hashlib.sha256()
    for s in samples:
        for name in ("input_ids", "labels", "position_ids"):
            value = getattr(s, name, None)
            h.update(b"-" if value is None else np.asarray(value, dtype=np.int64).tobytes())
            h.update(b"|")
    return h.hexdigest()


def check_compatible(problems: list[str], cfg: Config, where: Path) -> list[str]:
    """Raise `ResumeError` listing `problems` (lines from `config_diff`/`data_diff`) unless allowed."""
    if problems and not cfg.train.allow_config_change:
        raise ResumeError(
            f"cannot resume from {where}: the run differs from the one that wrote it:\n" + "\n".join(problems) +
            "\nRestore those settings, start afresh with train.resume=off (and output.overwrite=true), or "
            "continue anyway with train.allow_config_change=true")
    for line in problems:
        log.warning("resuming despite a difference:%s", line)
    return problems


def data_diff(saved: dict[str, str], current: dict[str, str]) -> list[str]:
    return [f"  the {split} data (token ids or labels of its samples) differ" for split, fp in current.items()
            if saved.get(split) != fp]


def clear_run(out: Path) -> None:
    """Remove what a previous run wrote (its completion marker first), before starting afresh."""
    (out / RUN_FILE).unlink(missing_ok=True)
    for name in RUN_OUTPUTS:
        p = out / name
        if p.is_dir():
            trash(p)
        elif p.exists():
            p.unlink()


def _from_path(path: Path, say: Callable[[str], None]) -> Path:
    if (path / "manifest.json").exists() or path.name.startswith("step-"):
        reason = verify(path)
        if reason:
            raise ResumeError(f"train.resume: {path} is not a complete checkpoint: {reason}")
        return path
    if path.is_dir():
        found = complete_checkpoints(path / CHECKPOINTS, say)
        if found:
            return found[0]
    raise ResumeError(f"train.resume: no complete checkpoint in {path} (expected a checkpoint folder or a run "
                      f"folder with {CHECKPOINTS}/step-*)")


def resume_mode(cfg: Config) -> str:
    """`auto`, `off` or a path (YAML reads a bare on/off as true/false)."""
    value = cfg.train.resume
    return ("auto" if value else "off") if isinstance(value, bool) else value


def plan_start(cfg: Config, say: Callable[[str], None] = log.warning) -> Path | None:
    """The checkpoint to continue from, or None to start at step 0 (after clearing a replaced run)."""
    out, mode = Path(cfg.output.dir), resume_mode(cfg)
    finished = (out / RUN_FILE).exists()
    if finished and not cfg.output.overwrite:
        raise ConfigError(f"output.dir {str(out)!r} already holds a finished run; choose another folder "
                          "or set output.overwrite=true")
    if mode not in ("auto", "off"):
        start = _from_path(Path(mode), say)
        (out / RUN_FILE).unlink(missing_ok=True)  # the run is unfinished again
        return start
    if mode == "auto" and not finished:
        found = complete_checkpoints(out / CHECKPOINTS, say)
        if found:
            return found[0]
    elif mode == "off" and list_checkpoints(out / CHECKPOINTS) and not cfg.output.overwrite:
        raise ConfigError(f"output.dir {str(out)!r} holds an unfinished run; continue it with train.resume=auto, "
                          "or set output.overwrite=true to start afresh")
    if out.exists():
        clear_run(out)
    return None


def drop_newer(root: Path, step: int, say: Callable[[str], None]) -> None:
    """Checkpoints after the resume point belong to an abandoned future (or failed their check): remove."""
    for folder in list_checkpoints(root):
        if step_of(folder) > step:
            say(f"removing {folder}: it is newer than the checkpoint training continues from")
            trash(folder)
