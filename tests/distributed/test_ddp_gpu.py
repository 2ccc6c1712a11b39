"""On two GPUs (NCCL): two ranks train what one process trains with the same global batch, as on CPU
(tests/distributed/test_ddp.py), fp32 compute, with the decoder's CUDA graphs as `auto` resolves them."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from ddp_helpers import launch, max_adapter_diff, train_rows
from test_ddp import STEPS, _sections
from train_helpers import config, write_run_yaml

from loratune.train.run import train

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")]


@pytest.mark.parametrize("batching", ["padded", "padding_free"])
def test_two_gpus_train_what_one_gpu_trains(tmp_path: Path, tiny_llama: Path, batching: str) -> None:
    outs = []
    for name, accum, world in (("one", 4, 1), ("two", 2, 2)):
        folder = tmp_path / name
        folder.mkdir()
        sections = {**_sections(accum, batching), "quantization": {"compute_dtype": "fp32"}}
        path = write_run_yaml(folder, tiny_llama, **sections)
        if world == 1:
            train(config(path))
        else:
            ranks = launch(path, 2, timeout=600)
            assert ranks.codes == [0, 0], ranks.tail()
        outs.append(folder / "out")
    assert max_adapter_diff(*outs) < 1e-6
    assert [r["tokens"] for r in train_rows(outs[0])] == [r["tokens"] for r in train_rows(outs[1])]
    assert len(train_rows(outs[1])) == STEPS
