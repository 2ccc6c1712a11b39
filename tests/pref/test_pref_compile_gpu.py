"""A DPO run on the decoder compiles FlexAttention once, however its pairs' lengths vary: its
padding-free streams are padded to the token budget on CUDA (`Resolved.pad_streams`), and a checkpointed block's
recompute on autograd's thread finds the forward pass's graph. (On the H200 the first DPO step of bench_dpo.py took
26 s, mostly FlexAttention compiles: per stream length, for the policy and the no-grad reference apart.)

Run on the GPU machine: `python -m pytest tests/pref/test_pref_compile_gpu.py -q -m gpu -s`.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from train_helpers import config, write_run_yaml

from loratune.train.metrics import read_rows
from loratune.train.run import train

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

PAIRS = Path(__file__).parents[2] / "examples" / "data" / "preference.jsonl"


def test_a_dpo_run_compiles_flex_attention_once(tmp_path: Path, tiny_llama: Path) -> None:
    from torch._dynamo.utils import counters

    sections = {"data": {"datasets": [{"path": str(PAIRS), "max_samples": 24}], "eval_split": 4, "max_length": 128},
                "train": {"method": "dpo", "optimizer": "adamw", "max_steps": 4, "save_every": 0, "eval_every": 4,
                          "batch_size": 2, "grad_accum": 2, "deterministic": False},
                "adapter": {"dropout": 0.0}, "model": {"implementation": "loratune"}}
    before = counters["stats"]["unique_graphs"]
    result = train(config(write_run_yaml(tmp_path, tiny_llama, **sections)))
    compiled = counters["stats"]["unique_graphs"] - before
    assert result.steps == 4 and math.isfinite(result.last_loss)
    lengths = {r.get("step_input_tokens") for r in read_rows(result.out_dir / "metrics.jsonl") if "loss" in r}
    print(f"FlexAttention graphs compiled in 4 DPO steps + eval: {compiled} (step input tokens {sorted(lengths)})")
    # one graph: the policy's training graph, which the no-grad reference and eval passes reuse (0 if compiled
    # before in this process, or with flash-attn)
    assert compiled <= 1
