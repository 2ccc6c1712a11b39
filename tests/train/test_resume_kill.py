"""Kill -9 at named moments (mid-step, each phase of a save), resume, and get the uninterrupted adapter.

Each test runs the base run once uninterrupted (in this process), then again in subprocesses: each
subprocess is killed at the next fault point of the chain and the following one resumes with
`train.resume=auto`, the default. The last one runs to the end. The final adapter must equal the
uninterrupted one byte for byte (CPU, deterministic mode), which needs the weights, optimizer state,
scheduler, every RNG and the data position to all come back exactly.
"""

from __future__ import annotations

import os
import random
import signal
import time
from pathlib import Path

import pytest
from train_helpers import adapter_bytes, config, run_cli, start_cli, write_run_yaml

from loratune.train.checkpoint import list_checkpoints, step_of
from loratune.train.metrics import read_rows
from loratune.train.run import train

KILLED = -signal.SIGKILL

# max_steps 8, save_every 3, 4 samples a step: padding-free, they make one micro-batch, so backward #k is in
# step k; saves at steps 3, 6, and 8 (final)
ADAMW_CHAIN = [
    "kill@step.backward#3",  # mid-step 3, before any checkpoint: restarts from step 0
    "kill@save.manifest#1",  # step 3's files and manifest written, folder not renamed: still nothing to resume
    "kill@save.renamed#1",  # step 3 in place, rotation not done
    "kill@save.files#1",  # step 6's files written, no manifest: resumes from 3
    "term@step.end#2",  # SIGTERM at the end of step 5: graceful checkpoint at 5
    "kill@step.backward#1",  # mid-step 6: resumes from 5
    "kill@save.rotated#1",  # step 6 saved and older rotated: resumes from 6
    "kill@save.renamed#1",  # the final checkpoint (8) is in place, the output folder not yet written
]
PAGED_CHAIN = ["kill@step.backward#5", "int@step.end#2", "kill@save.manifest#1"]  # int: Ctrl-C after step 5
# padded: 2 micro-batches a step, backward #k in step ceil(k/2); #3 is mid-step 2, then from 3 #3 is mid-step 5
PADDED_CHAIN = ["kill@step.backward#3", "kill@save.renamed#1", "kill@step.backward#3", "kill@save.files#1"]


def _reference(tmp_path: Path, model: Path, sections: dict) -> bytes:
    ref = tmp_path / "ref"
    ref.mkdir()
    result = train(config(write_run_yaml(ref, model, **sections)))
    assert result.steps == sections["train"].get("max_steps", 8)
    return adapter_bytes(result.out_dir)


def _chain(tmp_path: Path, model: Path, sections: dict, chain: list[str]) -> Path:
    """Run the chain of faults, each killing (or stopping) one subprocess, then one to the end."""
    path = write_run_yaml(tmp_path, model, **sections)
    for fault in chain:
        p = run_cli(path, fault=fault)
        expected = {"term": 143, "int": 130}.get(fault.split("@")[0], KILLED)
        assert p.returncode == expected, (fault, p.returncode, p.stderr[-3000:])
    p = run_cli(path)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "resuming from" in p.stderr and "training done: 8 steps" in p.stdout
    return tmp_path / "out"


CASES = {
    "adamw": ({"train": {"optimizer": "adamw"}}, ADAMW_CHAIN),
    "paged_adamw_32bit": ({"train": {"optimizer": "paged_adamw_32bit"}}, PAGED_CHAIN),
    # rank 64: lora_A has 64 x 64 = 4096 values, enough for bitsandbytes to keep 8-bit state
    "paged_adamw_8bit": ({"train": {"optimizer": "paged_adamw_8bit"}, "adapter": {"rank": 64}}, PAGED_CHAIN),
    "padded": ({"train": {"optimizer": "adamw", "batching": "padded"}}, PADDED_CHAIN),
    # the fallback model code, padding-free and padded
    "transformers": ({"model": {"implementation": "transformers"}, "train": {"optimizer": "adamw"}}, PAGED_CHAIN),
    "transformers-padded": ({"model": {"implementation": "transformers"},
                             "train": {"optimizer": "adamw", "batching": "padded"}}, PADDED_CHAIN),
}


@pytest.mark.parametrize("case", list(CASES))
def test_killed_and_resumed_run_ends_with_the_same_adapter(tmp_path: Path, tiny_llama: Path, case: str) -> None:
    sections, chain = CASES[case]
    want = _reference(tmp_path, tiny_llama, sections)
    out = _chain(tmp_path, tiny_llama, sections, chain)
    assert adapter_bytes(out) == want
    # every step was recorded exactly once despite the replays after each kill
    steps = [r["step"] for r in read_rows(out / "metrics.jsonl") if "loss" in r]
    assert steps == list(range(1, 9))
    assert not [p.name for p in (out / "checkpoints").iterdir() if p.name.startswith(".")]  # no leftovers
    assert [step_of(p) for p in list_checkpoints(out / "checkpoints")] == [8, 6]


def test_sigkill_at_random_moments(tmp_path: Path, tiny_llama: Path) -> None:
    """SIGKILL from outside after random delays (seeded), whatever the process is doing, then resume."""
    sections = {"train": {"max_steps": 120, "save_every": 3, "eval_every": 12}}
    want = _reference(tmp_path, tiny_llama, sections)
    path = write_run_yaml(tmp_path, tiny_llama, **sections)
    rng = random.Random(0)
    kills = 0
    for _ in range(8):
        proc, log = start_cli(path)
        proc.join(rng.uniform(0.3, 1.2))
        if proc.exitcode is not None:  # finished before the kill
            assert proc.exitcode == 0, log.read_text()[-3000:]
            break
        os.kill(proc.pid, signal.SIGKILL)
        proc.join()
        kills += 1
    else:
        assert run_cli(path).returncode == 0
    assert kills >= 3
    assert adapter_bytes(tmp_path / "out") == want


def test_sigterm_from_outside_saves_and_exits_cleanly(tmp_path: Path, tiny_llama: Path) -> None:
    """A real SIGTERM while training: the step finishes, a checkpoint is saved, the exit says how to resume."""
    path = write_run_yaml(tmp_path, tiny_llama, train={"max_steps": 400, "save_every": 0, "eval_every": 0})
    metrics = tmp_path / "out" / "metrics.jsonl"
    proc, log = start_cli(path)
    deadline = time.monotonic() + 120
    while not [r for r in read_rows(metrics) if r.get("step", 0) >= 2] and time.monotonic() < deadline:
        assert proc.is_alive(), log.read_text()[-3000:]
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGTERM)
    proc.join(120)
    stderr = log.read_text()
    assert proc.exitcode == 143, stderr[-3000:]
    assert "Traceback" not in stderr
    assert "stopped by SIGTERM after step" in stderr and "to resume, run the same command again" in stderr
    saved = list_checkpoints(tmp_path / "out" / "checkpoints")
    assert len(saved) == 1 and 2 <= step_of(saved[0]) < 400
    assert f"checkpoint saved: {saved[0]}" in stderr
