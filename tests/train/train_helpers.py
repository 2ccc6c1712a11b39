"""Helpers for the training tests: one small, fast run configuration and a way to run it in a subprocess.

The base run: the tiny Llama (4-bit NF4 base, rank-4 LoRA with dropout, so the RNG matters), 24 of the
quickstart conversations with 4 held out for eval, 8 optimizer steps of 2 micro-batches of 2, a
checkpoint every 3 steps, deterministic mode. It trains in about a second on one CPU core.
"""

from __future__ import annotations

import multiprocessing
import os
import re
import sys
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml

from loratune.config import Config, load_config

ROOT = Path(__file__).parents[2]
DATA = ROOT / "examples" / "data" / "quickstart.jsonl"


def base_config(model: Path, out: Path) -> dict:
    return {
        "model": {"path": str(model)},
        "adapter": {"rank": 4, "alpha": 8, "dropout": 0.1},
        "data": {"datasets": [{"path": str(DATA), "max_samples": 24}], "max_length": 128, "eval_split": 4},
        "train": {"max_steps": 8, "batch_size": 2, "grad_accum": 2, "lr": 3e-3, "scheduler": "cosine",
                  "warmup_steps": 2, "save_every": 3, "keep_last": 2, "log_every": 1, "deterministic": True,
                  "optimizer": "adamw", "plot": False},
        "output": {"dir": str(out), "overwrite": True},
    }


def write_run_yaml(tmp_path: Path, model_path: Path, /, **sections: dict) -> Path:
    """The base run (with `sections` merged in, `model` among them) as a YAML file writing to tmp_path/out."""
    data = base_config(model_path, tmp_path / "out")
    for name, values in sections.items():
        data.setdefault(name, {}).update(values)
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def config(path: Path, *overrides: str) -> Config:
    return load_config(path, list(overrides))


def _seed_of(name: str, x: str) -> int:
    """`layers.0.attn.q_proj.lora_B` for peft's `base_model.model.model.layers.0.self_attn.q_proj.lora_B.default.weight`
    and the decoder's `layers.0.attn.q_proj.lora_B`, as a number."""
    layer = re.sub(r"^(base_model\.model\.)?(model\.)?", "", name.split(f".lora_{x}")[0]).replace("self_attn", "attn")
    return zlib.crc32(f"{layer}.lora_{x}".encode())


def build_loop(model_path: Path, samples: list, *overrides: str, random_adapters: bool = True):
    """A `Loop` over `samples` exactly as `loratune train` sets one up (resolved decisions, model, runner,
    optimizer, batching), for a config of `overrides` on the model at `model_path` (pad id 1).
    `random_adapters`: A and B get random values seeded by the layer (the same on both model codes; peft's
    zero B would make A's gradient zero)."""
    from loratune.data.collate import Batching
    from loratune.model.build import build_trainable
    from loratune.model.memory import load_model_config
    from loratune.model.resolve import decide
    from loratune.train.loop import Loop
    from loratune.train.optim import build_optimizer
    from loratune.train.run import make_accelerator, make_runner

    cfg = load_config(None, [f"model.path={model_path}", *overrides])
    resolved = decide(cfg, model_config=load_model_config(cfg))
    torch.manual_seed(0)
    model = build_trainable(cfg, resolved)
    if random_adapters:
        with torch.no_grad():
            for name, p in model.module.named_parameters():
                for x, std in (("A", 0.1), ("B", 0.05)):  # seeded by the layer's name: the same on both codes
                    if f"lora_{x}" in name:
                        g = torch.Generator().manual_seed(_seed_of(name, x))  # drawn on the host: any device
                        p.copy_(torch.empty(p.shape, dtype=p.dtype).normal_(0, std, generator=g))
    acc = make_accelerator(resolved)
    runner, optimizer = make_runner(model, build_optimizer(model.module, cfg.train), cfg, acc)
    batching = Batching(resolved.padding_free, resolved.batch_size, resolved.tokens_per_batch, pad_id=1)
    return Loop(runner, samples, cfg.train, optimizer, acc, batching)


ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}  # as the in-process tests (conftest.py)

# Children are forked from a server process that has already imported torch, transformers, peft and
# loratune (but never computed anything, so no thread pool exists to be broken by the fork): a child
# starts in milliseconds instead of the ~5 s those imports take. Each child is a real process that
# SIGKILL ends with no cleanup at all, which is what the tests need.
# With CUDA, importing those libraries already touches the driver, which a fork cannot inherit: spawn.
if torch.cuda.is_available():
    _FORKS = multiprocessing.get_context("spawn")
else:
    _FORKS = multiprocessing.get_context("forkserver")
    _FORKS.set_forkserver_preload(["loratune.cli", "loratune.train.run"])


@dataclass
class Finished:
    returncode: int  # -9 when killed by SIGKILL, as subprocess reports it
    stdout: str  # stdout and stderr together, in order
    stderr: str


def _child(argv: list[str], env: dict[str, str], log: str) -> None:
    os.environ.update(env)
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    from loratune.cli import main

    torch.set_num_threads(1)
    code = main(argv)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def start_cli(path: Path, *overrides: str, fault: str = "") -> tuple[multiprocessing.Process, Path]:
    """Start `loratune train path overrides...` in a child process; returns it and its log file."""
    log = path.with_name(f"train-{time.monotonic_ns()}.log")
    env = {"LORATUNE_FAULT": fault, "LORATUNE_CACHE": os.environ.get("LORATUNE_CACHE", ""), **ONE_THREAD}
    proc = _FORKS.Process(target=_child, args=(["train", str(path), *overrides], env, str(log)))
    proc.start()
    return proc, log


def run_cli(path: Path, *overrides: str, fault: str = "", timeout: float = 180) -> Finished:
    """`loratune train path overrides...` in a child process, optionally with a fault point armed."""
    proc, log = start_cli(path, *overrides, fault=fault)
    proc.join(timeout)
    if proc.exitcode is None:
        proc.kill()
        proc.join()
        raise TimeoutError(f"training did not finish in {timeout}s: {log.read_text()[-3000:]}")
    text = log.read_text() if log.exists() else "(the child process wrote no log)"
    return Finished(proc.exitcode, text, text)


def adapter_bytes(folder: Path) -> bytes:
    return (folder / "adapter_model.safetensors").read_bytes()
