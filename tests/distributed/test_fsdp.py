"""FSDP2 on CPU over gloo: two ranks shard loratune's decoder (4-bit base, adapters, optimizer state) and train
what one process trains with the same global batch; kill -9 and resume; resume on another process count.

The reference is one process with grad_accum x 2, as in test_ddp.py; the sharded run has grad_accum 2 on each
of two ranks. FSDP reduce-scatters summed gradients (each rank's losses are divided by the window's global
token count), so only the order of float additions differs from one process: the same 1e-6 bound as DDP's
after 4 AdamW steps at lr 1e-3 (test_ddp.py's docstring says why that lr).
"""

from __future__ import annotations

import json
import math
import signal
from pathlib import Path

import pytest
import torch
from ddp_helpers import launch, max_adapter_diff, train_rows
from safetensors.torch import load_file
from train_helpers import adapter_bytes, config, write_run_yaml

from loratune.train.checkpoint import list_checkpoints, step_of
from loratune.train.metrics import read_rows
from loratune.train.run import train

STEPS = 4


def _sections(accum: int, batching: str, strategy: str = "fsdp", **train_extra: object) -> dict:
    return {"adapter": {"dropout": 0.0},  # dropout draws differ between layouts: off for the comparison
            "quantization": {"compute_dtype": "fp32"},
            "train": {"grad_accum": accum, "max_steps": STEPS, "save_every": 2, "lr": 1e-3, "batching": batching,
                      "strategy": strategy, **train_extra}}


def _one_process(tmp_path: Path, model: Path, batching: str, **train_extra: object) -> Path:
    folder = tmp_path / "one"
    folder.mkdir()
    result = train(config(write_run_yaml(folder, model, **_sections(4, batching, "auto", **train_extra))))
    assert result.steps == STEPS
    return result.out_dir


@pytest.mark.parametrize("batching, extra", [("padded", {}), ("padding_free", {"gradient_checkpointing": True}),
                                             ("padded", {"fsdp_offload": True})],
                         ids=["padded", "padding_free-checkpointing", "padded-offload"])
def test_fsdp_on_two_ranks_trains_what_one_process_trains(tmp_path: Path, tiny_llama: Path, batching: str,
                                                          extra: dict) -> None:
    """(On CPU the offload policy keeps the shards where they are: its code path runs, nothing moves.)"""
    one = _one_process(tmp_path, tiny_llama, batching, **{k: v for k, v in extra.items() if k != "fsdp_offload"})
    folder = tmp_path / "two"
    folder.mkdir()
    ranks = launch(write_run_yaml(folder, tiny_llama, **_sections(2, batching, **extra)), 2)
    assert ranks.codes == [0, 0], ranks.tail()
    two = folder / "out"
    assert "fsdp: 2 blocks and the root sharded over 2 processes" in ranks.logs[0], ranks.tail()
    assert max_adapter_diff(one, two) < 1e-6
    rows1, rows2 = train_rows(one), train_rows(two)
    assert [r["step"] for r in rows2] == list(range(1, STEPS + 1))
    for a, b in zip(rows1, rows2):
        assert a["tokens"] == b["tokens"]
        assert math.isclose(a["loss"], b["loss"], rel_tol=1e-6)
    evals = [[r["eval_loss"] for r in read_rows(out / "metrics.jsonl") if "eval_loss" in r] for out in (one, two)]
    assert len(evals[1]) >= 1 and len(evals[0]) == len(evals[1])
    assert all(math.isclose(a, b, rel_tol=1e-6) for a, b in zip(*evals))
    run = json.loads((two / "loratune_run.json").read_text())
    assert run["processes"] == 2 and run["strategy"] == "fsdp"
    # the checkpoint is in the one-process format: the same files, the optimizer state by parameter index
    ckpt1, ckpt2 = (out / "checkpoints" / f"step-{STEPS:08d}" for out in (one, two))
    s1, s2 = (load_file(str(c / "trainer_state.safetensors")) for c in (ckpt1, ckpt2))
    assert {k for k in s1 if k.startswith("optimizer.")} == {k for k in s2 if k.startswith("optimizer.")}
    assert max(float((s1[k] - s2[k]).abs().max()) for k in s1 if k.startswith("optimizer.")) < 1e-6


KILLED = -signal.SIGKILL


@pytest.mark.slow
def test_fsdp_kill_one_rank_then_resume_is_exact(tmp_path: Path, tiny_llama: Path) -> None:
    """The training tests' base run (dropout on: every rank's RNG matters) sharded on two ranks: rank 1 killed
    mid-step 5, then rank 0 (the writer) killed writing a checkpoint; resumed, the adapter is byte for byte the
    uninterrupted sharded run's (the optimizer shards come back from the one-process format exactly)."""
    ref = tmp_path / "ref"
    ref.mkdir()
    ranks = launch(write_run_yaml(ref, tiny_llama, train={"strategy": "fsdp"}), 2)
    assert ranks.codes == [0, 0], ranks.tail()
    expected = adapter_bytes(ref / "out")
    path = write_run_yaml(tmp_path, tiny_llama, train={"strategy": "fsdp"})
    for rank, fault, saved in [(1, "kill@step.backward#5", 3), (0, "kill@save.files#1", 3)]:
        ranks = launch(path, 2, faults={rank: fault})
        assert None not in ranks.codes, ranks.tail()  # nobody hangs on a dead peer
        assert ranks.codes[rank] == KILLED and ranks.codes[1 - rank] != 0, ranks.tail()
        assert max(step_of(p) for p in list_checkpoints(tmp_path / "out" / "checkpoints")) == saved
    ranks = launch(path, 2)
    assert ranks.codes == [0, 0], ranks.tail()
    assert adapter_bytes(tmp_path / "out") == expected


def test_resume_on_another_process_count_keeps_the_global_batch(tmp_path: Path, tiny_llama: Path) -> None:
    """A sharded two-rank checkpoint (grad_accum 2: windows of 4 index lists) resumed by one process: refused with
    grad_accum 2 (windows of 2: the data position would not carry over), with the fix named; with grad_accum 4 it
    continues and ends where the uninterrupted two-rank run ends (to rounding: the sums are laid out differently)."""
    ref = tmp_path / "ref"
    ref.mkdir()
    ranks = launch(write_run_yaml(ref, tiny_llama, **_sections(2, "padded")), 2)
    assert ranks.codes == [0, 0], ranks.tail()
    path = write_run_yaml(tmp_path, tiny_llama, **_sections(2, "padded"))
    stopped = launch(path, 2, faults={0: "term@step.end#2"})  # checkpoint of step 2 of 4
    assert stopped.codes == [128 + signal.SIGTERM] * 2, stopped.tail()
    refused = launch(path, 1)
    assert refused.codes == [2], refused.tail()
    assert "written by 2 process(es), this run has 1" in refused.logs[0], refused.tail()
    assert "set train.grad_accum=4" in refused.logs[0] and "Traceback" not in refused.logs[0]
    alone = launch(path, 1, "train.grad_accum=4", "train.strategy=auto")
    assert alone.codes == [0], alone.tail()
    assert "resuming on 1 process(es) a checkpoint written by 2" in alone.logs[0], alone.tail()
    assert max_adapter_diff(ref / "out", tmp_path / "out") < 1e-6
    rows = train_rows(tmp_path / "out")
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    assert [r["tokens"] for r in rows] == [r["tokens"] for r in train_rows(ref / "out")]


def test_a_sharded_process_group_of_one_trains_as_one_process(tmp_path: Path, tiny_llama: Path) -> None:
    """The fsdp path with a world of one (gloo): every all-gather and reduce-scatter runs, on one rank; the adapter
    and the optimizer state are the plain run's (tests/distributed/test_fsdp_gpu.py does the same on a GPU)."""
    import torch
    import torch.distributed as dist
    from ddp_helpers import free_port

    if torch.cuda.is_available():
        pytest.skip("the CPU case runs on machines without a GPU (training picks the GPU when there is one)")
    outs = []
    for name in ("plain", "grouped"):
        folder = tmp_path / name
        folder.mkdir()
        path = write_run_yaml(folder, tiny_llama, **_sections(4, "padding_free"))
        if name == "grouped":
            dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
        try:
            result = train(config(path))
        finally:
            if name == "grouped":
                dist.destroy_process_group()
        outs.append(result.out_dir)
    assert json.loads((outs[1] / "loratune_run.json").read_text())["strategy"] == "fsdp"
    assert json.loads((outs[0] / "loratune_run.json").read_text())["strategy"] == "single"
    assert max_adapter_diff(*outs) < 1e-6


def test_what_fsdp_does_not_train_is_refused_with_advice() -> None:
    from loratune.errors import ConfigError
    from loratune.train.fsdp import check_supported

    check_supported(True, "sft")
    with pytest.raises(ConfigError, match="model.implementation=decoder"):
        check_supported(False, "sft")
    with pytest.raises(ConfigError, match="dpo is not tested under it yet: use train.strategy ddp"):
        check_supported(True, "dpo")
    with pytest.raises(ConfigError, match=r"full fine-tuning \(adapter.type none\)"):
        check_supported(True, "sft", "none")
    with pytest.raises(ConfigError, match="quantization.compute_dtype=bf16"):
        check_supported(True, "sft", "lora", torch.float16)
