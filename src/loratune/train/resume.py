"""Deciding where a run starts, and refusing to resume into a different run.

`train.resume`:
    auto   an unfinished run in output.dir continues from its newest complete checkpoint; a finished
           run is continued only when asked for more steps (below), replaced only with output.overwrite;
           otherwise training starts from step 0
    off    always start from step 0 (a previous run in output.dir needs output.overwrite)
    PATH   continue from that checkpoint folder, or from the newest complete one of that run folder

A finished run in output.dir (its `loratune_run.json` exists), run again with train.resume auto:
    output.overwrite true                 discarded, said so with its step count; training starts at step 0
    planned length raised (train.max_steps or train.epochs)
                                          continued from its final checkpoint, exactly (weights, optimizer,
                                          data position, RNG), said so in one line
    same length                           nothing is trained: `AlreadyFinished` says it is finished and how
                                          to continue it instead (`train` reports it and exits 0)
    shorter, or other settings            refused: that is another run (overwrite it or choose a folder)

The learning-rate schedule of a continued run is the one of a run planned for the new total from the
start: the optimizer steps K+1.. use the rates a run of the new length uses there (see
`optim.apply_schedule`). With a `constant` schedule (the default) a run of K steps continued to N is
therefore the run of N steps, bit for bit; with `linear` or `cosine` the rate goes back up from the
finished run's final (decayed) rate to the new curve's value at step K+1 and decays to zero at N. The
one-line message gives both rates.

A checkpoint records a hash of the config and a fingerprint of the training data. Resuming with a
different config or data is refused with the list of what changed, unless train.allow_config_change.
Keys that cannot change the trained weights (logging, checkpoint cadence, output location, sample
prompts) are left out of the comparison, and so is the run's length (train.max_steps, train.epochs),
which a resumed run may change: that is how a run is made longer.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from loratune.config import REQUIRED, Config, to_dict
from loratune.errors import ConfigError, LoratuneError
from loratune.train.checkpoint import (CHECKPOINTS, checkpoint_name, complete_checkpoints, list_checkpoints, step_of,
                                       trash, verify)
from loratune.train.loop import total_steps
from loratune.train.run_folder import CONFIG_FILE, RUN_FILE

log = logging.getLogger("loratune.train")


# Keys whose change cannot change the weights a run produces: not part of the comparison.
BOOKKEEPING = frozenset({
    "train.resume", "train.allow_config_change", "train.log_every", "train.tensorboard", "train.plot",
    "train.save_every", "train.keep_last", "output.dir", "output.overwrite", "output.sample_prompts",
    "output.sample_max_new_tokens", "data.num_proc", "data.cache",
    # how many processes train is checked against the checkpoint itself (train.distributed.check_checkpoint_world)
    "train.devices", "train.strategy",
})
# Sections that only measure (never change what is trained): any of their keys may change on resume.
BOOKKEEPING_SECTIONS = ("train.eval_benchmark.",)
# The run's length: may change on resume (the run is made longer or shorter; the schedule follows).
LENGTH = frozenset({"train.max_steps", "train.epochs"})
RUN_OUTPUTS = ("metrics.jsonl", "loss.png", "tensorboard", "samples.json", CHECKPOINTS)


class ResumeError(LoratuneError):
    """The run cannot continue from the checkpoint asked for."""


class AlreadyFinished(Exception):
    """output.dir holds this very run, finished: nothing to train. `message` says how to continue it."""

    def __init__(self, message: str, finished: FinishedRun) -> None:
        super().__init__(message)
        self.message, self.finished = message, finished


@dataclass(frozen=True)
class FinishedRun:
    """What a finished run recorded about itself in its `loratune_run.json`."""

    out: Path
    steps: int  # optimizer steps it ran
    total: int  # steps it was planned for (more than `steps` if it stopped early)
    steps_per_epoch: int | None  # None: written by a loratune that did not record it
    facts: dict

    @property
    def checkpoint(self) -> Path:
        return self.out / CHECKPOINTS / checkpoint_name(self.steps)


@dataclass(frozen=True)
class Start:
    """Where a run starts: a checkpoint (None: step 0), and the finished run it continues, if it does."""

    checkpoint: Path | None = None
    continues: FinishedRun | None = None


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
    return {k: v for k, v in flat.items()
            if k not in BOOKKEEPING and k not in LENGTH and not k.startswith(BOOKKEEPING_SECTIONS)}


def config_hash(cfg: Config | dict) -> str:
    return hashlib.sha256(json.dumps(comparable(cfg), sort_keys=True).encode()).hexdigest()


def _defaults() -> dict[str, Any]:
    """The schema's default of every comparable key (the required ones left out)."""
    return {k: v for k, v in comparable(Config()).items() if v != REQUIRED}


def config_diff(old: dict, new: dict) -> list[str]:
    """Readable lines `key: old -> new` for every comparable key that differs.

    A key the saved config does not have (written by an older loratune, before the key existed) is no difference
    while the current value is the key's default: a new key's default keeps the behaviour it had before.
    """
    a, b = comparable(old), comparable(new)
    missing = object()
    defaults = _defaults()
    lines = []
    for key in sorted(set(a) | set(b)):
        va, vb = a.get(key, missing), b.get(key, missing)
        if va is missing and key in defaults and vb == defaults[key]:
            continue
        if va != vb:
            show = lambda v: "(absent)" if v is missing else json.dumps(v)  # noqa: E731
            lines.append(f"  {key}: {show(va)} -> {show(vb)}")
    return lines


def data_fingerprint(samples: list) -> str:
    """SHA-256 over every sample's token ids, labels and positions, in order (and KTO's desirable label)."""
    h = hashlib.sha256()
    for s in samples:
        for name in ("input_ids", "labels", "position_ids"):
            value = getattr(s, name, None)
            h.update(b"-" if value is None else np.asarray(value, dtype=np.int64).tobytes())
            h.update(b"|")
        desirable = getattr(s, "desirable", None)  # only KTO's completions have one: other samples hash as before
        if desirable is not None:
            h.update(b"+" if desirable else b"!")
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


def read_finished(out: Path) -> FinishedRun | None:
    """The finished run in `out`, or None if there is none (no or unreadable `loratune_run.json`)."""
    try:
        facts = json.loads((out / RUN_FILE).read_text(encoding="utf-8"))
        steps = int(facts["steps"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    per_epoch = facts.get("steps_per_epoch")
    return FinishedRun(out, steps, int(facts.get("total_steps") or steps),
                       int(per_epoch) if per_epoch else None, facts)


def plan_start(cfg: Config, say: Callable[[str], None] = log.warning) -> Start:
    """Where this run starts (after clearing a run it replaces); see the module docstring for the rules.

    Raises `AlreadyFinished` when output.dir holds this run finished and the config asks for no more steps.
    """
    out, mode = Path(cfg.output.dir), resume_mode(cfg)
    done = read_finished(out)
    if mode not in ("auto", "off"):
        if done is not None and not cfg.output.overwrite:
            raise ConfigError(f"output.dir {str(out)!r} already holds a finished run ({done.steps} steps); choose "
                              "another folder to continue that checkpoint in, or set output.overwrite=true")
        start = _from_path(Path(mode), say)
        (out / RUN_FILE).unlink(missing_ok=True)  # the run is unfinished again
        return Start(start)
    if done is not None:
        return _after_finished(cfg, done, mode, say)
    if mode == "auto":
        found = complete_checkpoints(out / CHECKPOINTS, say)
        if found:
            return Start(found[0])
    elif list_checkpoints(out / CHECKPOINTS) and not cfg.output.overwrite:
        raise ConfigError(f"output.dir {str(out)!r} holds an unfinished run; continue it with train.resume=auto, "
                          "or set output.overwrite=true to start afresh")
    if out.exists():
        clear_run(out)
    return Start()


def _after_finished(cfg: Config, done: FinishedRun, mode: str, say: Callable[[str], None]) -> Start:
    """Discard (overwrite), continue (a longer run asked for) or refuse; `AlreadyFinished` if nothing to do."""
    out = done.out
    if cfg.output.overwrite:
        say(f"output.overwrite=true: discarding the finished run in {out} ({_described(done)}); training starts "
            "again from step 0. To continue that run instead, run with output.overwrite=false and a larger "
            f"{_length_key(cfg)}")
        clear_run(out)
        return Start()
    if mode == "off":
        raise ConfigError(f"output.dir {str(out)!r} already holds a finished run ({_described(done)}); "
                          "train.resume=off starts from step 0 only with output.overwrite=true (or choose another "
                          f"folder); to continue that run, use train.resume=auto with a larger {_length_key(cfg)}")
    reason = verify(done.checkpoint)
    if reason is not None:
        raise ConfigError(f"output.dir {str(out)!r} holds a finished run ({_described(done)}) whose final "
                          f"checkpoint {done.checkpoint} cannot be used ({reason}), so it cannot be continued; "
                          "choose another output.dir, or set output.overwrite=true to replace it")
    saved = yaml.safe_load((done.checkpoint / CONFIG_FILE).read_text(encoding="utf-8"))
    current = to_dict(cfg)
    if current["train"]["batch_size"] == "auto":  # resolved later to the checkpoint's own batch size
        current["train"]["batch_size"] = saved["train"]["batch_size"]
    problems = config_diff(saved, current)
    if problems and not cfg.train.allow_config_change:
        raise ConfigError(f"output.dir {str(out)!r} holds a finished run ({_described(done)}) with other "
                          "settings:\n" + "\n".join(problems) + "\nTo continue that run, restore them; to replace "
                          "it, set output.overwrite=true (or choose another output.dir); to continue it with these "
                          "settings anyway, set train.allow_config_change=true")
    if cfg.train.max_steps > 0 or done.steps_per_epoch is not None:  # else decided once the data is loaded
        judge_length(cfg, done, total_steps(cfg.train, done.steps_per_epoch or 1))
    return Start(done.checkpoint, done)


def judge_length(cfg: Config, done: FinishedRun, total: int) -> None:
    """Continuing `done` to `total` steps: fine if longer than planned; else `AlreadyFinished` or refused."""
    if total > done.total:
        return
    if total < done.total:
        raise ConfigError(f"output.dir {str(done.out)!r} holds a finished run ({_described(done)}); this config "
                          f"plans {total} steps, fewer: that is another run. Choose another output.dir, or set "
                          "output.overwrite=true to replace it")
    raise AlreadyFinished(finished_message(cfg, done), done)


def finished_message(cfg: Config, done: FinishedRun) -> str:
    """What `loratune train` says instead of retraining a finished run with nothing more to do."""
    t = cfg.train
    raise_it = (f"raise train.max_steps (now {t.max_steps}; e.g. train.max_steps={2 * t.max_steps})" if t.max_steps > 0
                else f"raise train.epochs (now {t.epochs:g}; e.g. train.epochs={2 * t.epochs:g}) or set "
                     f"train.max_steps above {done.total}")
    return (f"{done.out} already holds this run, finished: {_described(done)}. Nothing to train.\n"
            f"To train it further, {raise_it} and run again: training continues "
            f"from its final checkpoint (step {done.steps}) exactly. To train it afresh, set output.overwrite=true.\n"
            f"chat with it:  loratune chat {done.out}")


def continue_message(cfg: Config, done: FinishedRun, total: int, lr_saved: float, lr: float) -> str:
    """The one line a continued finished run prints: from where to where, exactly, and the learning rate."""
    early = ("; it had stopped early: it stops again at its next evaluation unless the eval loss improves"
             if done.total > done.steps else "")
    return (f"continuing the finished run in {done.out} from its final checkpoint (step {done.steps}) to step {total} "
            f"({total - done.steps} more), exactly where it stopped (weights, optimizer state, data order, random "
            f"state); {_schedule_note(cfg, done.steps, total, lr_saved, lr)}{early}")


def length_message(cfg: Config, step: int, planned: int, total: int, lr_saved: float, lr: float) -> str:
    """The line a resumed run prints when its length changed since the checkpoint."""
    return (f"the run now ends at step {total} instead of {planned}; "
            f"{_schedule_note(cfg, step, total, lr_saved, lr)}")


def _schedule_note(cfg: Config, step: int, total: int, lr_saved: float, lr: float) -> str:
    kind = cfg.train.scheduler
    if lr == lr_saved:
        return f"lr {lr:.2e} at step {step + 1} ({kind} schedule)"
    return (f"{kind} lr schedule now planned over {total} steps from the start: step {step + 1} uses {lr:.2e} "
            f"(the checkpoint's schedule gave {lr_saved:.2e})")


def _described(done: FinishedRun) -> str:
    """'8 steps, train loss 1.2345, best eval loss 1.3456 at step 6' from the run's own record."""
    f = done.facts
    parts = [f"{done.steps} steps" + (f" of {done.total} (stopped early)" if done.total > done.steps else "")]
    if isinstance(f.get("train_loss"), (int, float)):
        parts.append(f"train loss {f['train_loss']:.4f}")
    if isinstance(f.get("best_eval_loss"), (int, float)):
        parts.append(f"best eval loss {f['best_eval_loss']:.4f} at step {f.get('best_step')}")
    return ", ".join(parts)


def _length_key(cfg: Config) -> str:
    return "train.max_steps" if cfg.train.max_steps > 0 else "train.epochs (or train.max_steps)"


def drop_newer(root: Path, step: int, say: Callable[[str], None]) -> None:
    """Checkpoints after the resume point belong to an abandoned future (or failed their check): remove."""
    for folder in list_checkpoints(root):
        if step_of(folder) > step:
            say(f"removing {folder}: it is newer than the checkpoint training continues from")
            trash(folder)
