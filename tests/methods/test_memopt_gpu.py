"""The memory-efficient optimizers (train.optimizer galore_adamw, apollo_adamw, adam_mini, badam) on a CUDA GPU
with a bf16 base: a full fine-tuning run through `loratune train` lowers the loss, and a run resumed from its
step-3 checkpoint ends within bf16 rounding of the uninterrupted one (BAdam rebuilds its fp32 copy of the active
layer from the bf16 weights on resume, so not bit for bit there).

Run on the GPU machine: `python -m pytest tests/methods/test_memopt_gpu.py -q -m gpu`. Skipped without CUDA.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from train_helpers import config, write_run_yaml

from loratune.train.checkpoint import list_checkpoints, step_of
from loratune.train.run import train

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.mark.parametrize("optimizer, extra", [
    ("galore_adamw", {"optim_rank": 8, "optim_update_proj_gap": 4}),
    ("apollo_adamw", {"optim_rank": 8, "optim_update_proj_gap": 4}),
    ("adam_mini", {}),
    ("badam", {"badam_switch_every": 4}),
])
def test_bf16_run_lowers_the_loss_and_resumes(tmp_path: Path, tiny_llama: Path, optimizer: str, extra: dict) -> None:
    sections = {"adapter": {"type": "none"}, "quantization": {"bits": 16, "compute_dtype": "bf16"},
                "train": {"optimizer": optimizer, "max_steps": 12, "save_every": 3, "keep_last": 0, "lr": 1e-3,
                          "deterministic": False, **extra}}
    for d in ("ref", "resumed"):
        (tmp_path / d).mkdir()
    ref = train(config(write_run_yaml(tmp_path / "ref", tiny_llama, **sections)))
    rows = [json.loads(line) for line in (ref.out_dir / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert len(losses) >= 10 and sum(losses[-3:]) / 3 < sum(losses[:3]) / 3, losses
    at3 = [c for c in list_checkpoints(ref.out_dir / "checkpoints") if step_of(c) == 3][0]
    resumed = train(config(write_run_yaml(tmp_path / "resumed", tiny_llama, **sections), f"train.resume={at3}"))
    a, b = load_file(str(ref.out_dir / "model.safetensors")), load_file(str(resumed.out_dir / "model.safetensors"))
    for k in a:
        assert torch.allclose(a[k].float(), b[k].float(), atol=2e-2, rtol=0), k
