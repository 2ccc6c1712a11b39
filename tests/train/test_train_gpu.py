"""The training engine on a GPU: bf16 and fp16-with-scaler mixed precision, kill-and-resume, paged state.

Run on the GPU machine: `python -m pytest tests/train/test_train_gpu.py -q -m gpu`. Skipped without CUDA.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from train_helpers import adapter_bytes, config, run_cli, write_run_yaml

from loratune.config import TrainConfig
from loratune.train.checkpoint import checkpoint_name
from loratune.train.run import train

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_mixed_precision_trains_and_resumes_exactly(tmp_path: Path, tiny_llama: Path, dtype: str) -> None:
    sections = {"quantization": {"compute_dtype": dtype}, "train": {"optimizer": "paged_adamw_32bit"}}
    ref = tmp_path / "ref"
    ref.mkdir()
    want = train(config(write_run_yaml(ref, tiny_llama, **sections)))
    assert want.steps == 8 and want.last_loss == want.last_loss  # finite
    state = json.loads((want.out_dir / "checkpoints" / checkpoint_name(8) / "trainer_state.json").read_text())
    if dtype == "fp16":  # the loss scaler is used and its state saved
        assert state["scaler"]["scale"] > 0
    else:
        assert state["scaler"] == {}
    from safetensors.torch import load_file

    tensors = load_file(str(want.out_dir / "checkpoints" / checkpoint_name(8) / "trainer_state.safetensors"))
    assert "rng.cuda.0" in tensors and "rng.torch" in tensors

    path = write_run_yaml(tmp_path, tiny_llama, **sections)
    for fault in ("kill@step.backward#5", "kill@save.manifest#1"):  # one padding-free micro-batch a step: step 5
        assert run_cli(path, fault=fault).returncode == -9
    done = run_cli(path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert adapter_bytes(tmp_path / "out") == adapter_bytes(want.out_dir)


def test_paged_state_stays_paged_after_a_reload() -> None:
    from loratune.train.optim import build_optimizer
    from loratune.train.trainer_state import load_optimizer_state, optimizer_state

    torch.manual_seed(0)
    model = torch.nn.Linear(512, 512, device="cuda")  # >= 1e5 values: bitsandbytes pages its state
    cfg = TrainConfig(optimizer="paged_adamw_32bit")
    opt = build_optimizer(model, cfg)
    model(torch.randn(4, 512, device="cuda")).sum().backward()
    opt.step()
    tensors, meta = optimizer_state(opt)
    fresh = build_optimizer(model, cfg)
    load_optimizer_state(fresh, {k: v.clone() for k, v in tensors.items()}, json.loads(json.dumps(meta)))
    s = fresh.state[model.weight]
    assert getattr(s["state1"], "is_paged", False) and getattr(s["state2"], "is_paged", False)
    assert torch.equal(s["state1"].cpu(), tensors["optimizer.0.state1"])
