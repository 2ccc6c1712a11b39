"""FSDP on GPUs (NCCL), fp32 compute: the sharded path with a process group of one on the device trains what the
plain run trains (every collective, FSDP's all-gathers and reduce-scatters included, runs on a world of one);
on two GPUs (skipped with fewer) two sharded ranks train what one GPU trains with the same global batch, with
and without activation checkpointing, and with the shards offloaded to host memory."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from ddp_helpers import free_port, launch, max_adapter_diff, train_rows
from safetensors.torch import load_file
from test_fsdp import STEPS, _sections
from train_helpers import config, write_run_yaml

from loratune.train.run import train

pytestmark = pytest.mark.gpu


def _plain_and_grouped(tmp_path: Path, model: Path, **train_extra: object) -> tuple[Path, Path]:
    outs = []
    for name in ("plain", "grouped"):
        folder = tmp_path / name
        folder.mkdir()
        sections = _sections(4, "padding_free", **train_extra)  # fp32 compute
        path = write_run_yaml(folder, model, **sections)
        if name == "plain":
            result = train(config(path))
        else:
            dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
            try:
                result = train(config(path))
            finally:
                dist.destroy_process_group()
        assert result.steps == STEPS
        outs.append(result.out_dir)
    return outs[0], outs[1]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_a_sharded_process_group_of_one_on_the_gpu_trains_as_one_gpu(tmp_path: Path, tiny_llama: Path) -> None:
    plain, grouped = _plain_and_grouped(tmp_path, tiny_llama)
    assert max_adapter_diff(plain, grouped) < 1e-6
    assert (grouped / "loratune_run.json").read_text().count('"strategy": "fsdp"') == 1
    a, b = (load_file(str(o / "checkpoints" / f"step-{STEPS:08d}" / "trainer_state.safetensors")) for o in
            (plain, grouped))
    assert max(float((a[k] - b[k]).abs().max()) for k in a if k.startswith("optimizer.")) < 1e-6


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
@pytest.mark.parametrize("extra", [{}, {"gradient_checkpointing": True}, {"fsdp_offload": True}],
                         ids=["plain", "checkpointing", "offload"])
def test_two_sharded_gpus_train_what_one_gpu_trains(tmp_path: Path, tiny_llama: Path, extra: dict) -> None:
    outs = []
    for name, accum, world in (("one", 4, 1), ("two", 2, 2)):
        folder = tmp_path / name
        folder.mkdir()
        sections = _sections(accum, "padding_free", "fsdp" if world == 2 else "auto", **extra)  # fp32 compute
        path = write_run_yaml(folder, tiny_llama, **sections)
        if world == 1:
            train(config(path))
        else:
            ranks = launch(path, 2, timeout=600)
            assert ranks.codes == [0, 0], ranks.tail()
        outs.append(folder / "out")
    assert max_adapter_diff(*outs) < 1e-6
    assert [r["tokens"] for r in train_rows(outs[0])] == [r["tokens"] for r in train_rows(outs[1])]
