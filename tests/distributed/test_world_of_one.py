"""The multi-process code path with a world of one: a process group of size 1 (gloo on CPU, NCCL on a GPU)
makes every collective of `loratune.train.distributed` run (count, loss and gradient all-reduces, the stop
flag, the RNG gather, the barriers); the adapter must equal the run without a process group."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from ddp_helpers import free_port
from safetensors.torch import load_file
from train_helpers import config, write_run_yaml

from loratune.train.distributed import World
from loratune.train.run import train


def _run(folder: Path, model: Path, device: str) -> dict[str, torch.Tensor]:
    folder.mkdir()
    sections = {"adapter": {"dropout": 0.0}, "quantization": {"compute_dtype": "fp32"},
                "train": {"max_steps": 4, "save_every": 2, "lr": 1e-3}}
    result = train(config(write_run_yaml(folder, model, **sections)))
    assert result.steps == 4
    assert result.out_dir.joinpath("checkpoints", "step-00000004", "trainer_state.json").is_file()
    return load_file(str(result.out_dir / "adapter_model.safetensors"))


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_a_process_group_of_one_trains_as_one_process(tmp_path: Path, tiny_llama: Path, device: str) -> None:
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a GPU")
    if device == "cpu" and torch.cuda.is_available():
        pytest.skip("the CPU case runs on machines without a GPU (training picks the GPU when there is one)")
    plain = _run(tmp_path / "plain", tiny_llama, device)
    dist.init_process_group("nccl" if device == "cuda" else "gloo", init_method=f"tcp://127.0.0.1:{free_port()}",
                            rank=0, world_size=1)
    try:
        assert World().active
        grouped = _run(tmp_path / "grouped", tiny_llama, device)
    finally:
        dist.destroy_process_group()
    assert plain.keys() == grouped.keys()
    assert max(float((plain[k] - grouped[k]).abs().max()) for k in plain) < 1e-6
    assert any(bool((t != 0).any()) for k, t in grouped.items() if "lora_B" in k)
