"""Launch `loratune train` as N ranks of one gloo process group, the way torchrun does (RANK, WORLD_SIZE,
LOCAL_RANK, MASTER_ADDR, MASTER_PORT in each process's environment), forked from the training tests' preloaded
server (tests/train/train_helpers.py) so each rank starts in milliseconds and SIGKILL ends it with no cleanup;
and what the multi-process tests compare of two runs (their adapters, their training rows).
"""

from __future__ import annotations

import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path

from safetensors.torch import load_file
from train_helpers import _FORKS, ONE_THREAD, _child

from loratune.train.metrics import read_rows


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Ranks:
    codes: list[int | None]  # exit code of each rank (-9: SIGKILL; None: still running at the timeout, then killed)
    logs: list[str]

    def tail(self) -> str:
        return "\n".join(f"--- rank {r} (exit {c})\n{log[-2500:]}" for r, (c, log) in enumerate(zip(self.codes,
                                                                                                    self.logs)))


def launch(path: Path, world: int, *overrides: str, faults: dict[int, str] | None = None,
           timeout: float = 120) -> Ranks:
    """`loratune train path overrides...` on `world` ranks; `faults`: {rank: LORATUNE_FAULT} armed on that rank."""
    port, faults = free_port(), faults or {}
    procs, logs = [], []
    for rank in range(world):
        log = path.with_name(f"rank{rank}-{time.monotonic_ns()}.log")
        env = {"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_WORLD_SIZE": str(world),
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "LORATUNE_FAULT": faults.get(rank, ""),
               "LORATUNE_CACHE": os.environ.get("LORATUNE_CACHE", ""), **ONE_THREAD}
        p = _FORKS.Process(target=_child, args=(["train", str(path), *overrides], env, str(log)))
        p.start()
        procs.append(p)
        logs.append(log)
    deadline = time.monotonic() + timeout
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
    codes = [p.exitcode for p in procs]
    for p in procs:
        if p.exitcode is None:
            p.kill()
            p.join()
    return Ranks(codes, [log.read_text() if log.exists() else "" for log in logs])


def max_adapter_diff(a: Path, b: Path) -> float:
    """The largest difference between two runs' saved adapters (same keys; at least one lora_B moved)."""
    x, y = load_file(str(a / "adapter_model.safetensors")), load_file(str(b / "adapter_model.safetensors"))
    assert x.keys() == y.keys()
    assert any(bool((t != 0).any()) for k, t in x.items() if "lora_B" in k)  # it trained
    return max(float((x[k] - y[k]).abs().max()) for k in x)


def train_rows(out: Path) -> list[dict]:
    """A run's training rows of metrics.jsonl (those with a loss)."""
    return [r for r in read_rows(out / "metrics.jsonl") if "loss" in r]
