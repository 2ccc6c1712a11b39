"""Training with CUDA graphs (loratune.kernels.graphs) on the GPU: used where it applies (loratune's decoder's
padding-free streams, padded to the token budget), same training as eager; never on the transformers fallback,
which runs as transformers and peft ship.

Run on the GPU machine: `python -m pytest tests/train/test_graphs_gpu.py -q`. Skipped without CUDA.
"""

from __future__ import annotations

import logging
import random
from pathlib import Path

import pytest
import torch
from train_helpers import config, write_run_yaml

from loratune.train.metrics import read_rows
from loratune.train.run import train

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

WORDS = "the model learns to answer questions about quantization adapters memory and training data".split()


def _text_run(tmp_path: Path, tiny_llama: Path, name: str, *overrides: str, decoder: bool = False):
    """Plain text split into 64-token rows: every micro-batch has the same shape and no padding."""
    data = tmp_path / "corpus.txt"
    if not data.exists():
        rng = random.Random(0)
        data.write_text(" ".join(rng.choice(WORDS) for _ in range(6000)) + "\n")
    folder = tmp_path / name
    folder.mkdir()
    sections = {"adapter": {"rank": 4, "alpha": 8, "dropout": 0.0},
                "data": {"datasets": [{"path": str(data), "format": "text"}], "max_length": 64, "eval_split": 0},
                "train": {"max_steps": 6, "batch_size": 2, "grad_accum": 2, "deterministic": False,
                          "save_every": 0, "optimizer": "adamw"}}
    # graphs replay the decoder's padding-free streams; the transformers fallback's padded rows run eagerly
    code = (["model.implementation=loratune", "train.tokens_per_batch=160"] if decoder
            else ["model.implementation=transformers", "train.batching=padded"])
    return train(config(write_run_yaml(folder, tiny_llama, **sections), "quantization.compute_dtype=bf16", *code,
                        *overrides))


def test_the_transformers_fallback_is_never_graphed(tmp_path: Path, tiny_llama: Path, caplog, capsys) -> None:
    """Unpadded rows of one shape on transformers + peft: no capture is even tried, and the model learns."""
    caplog.set_level(logging.INFO, logger="loratune.kernels.graphs")
    run = _text_run(tmp_path, tiny_llama, "hf")
    assert "CUDA graph" not in caplog.text
    assert "micro-batches replayed" not in capsys.readouterr().out
    losses = [r["loss"] for r in read_rows(run.out_dir / "metrics.jsonl") if "loss" in r]
    assert len(losses) == 6 and losses[-1] < losses[0]


def test_the_decoders_streams_are_graphed_and_train_like_eager(tmp_path: Path, tiny_llama: Path, caplog,
                                                                capsys) -> None:
    """Streams of two or three 64-token rows padded to 160 tokens: one shape, captured once (boundaries read on
    the GPU), the same losses as the eager run."""
    caplog.set_level(logging.INFO, logger="loratune.kernels.graphs")
    graphed = _text_run(tmp_path, tiny_llama, "graphs", decoder=True)
    assert "capture failed" not in caplog.text and "captured a CUDA graph" in caplog.text, caplog.text
    assert "micro-batches replayed" in capsys.readouterr().out
    eager = _text_run(tmp_path, tiny_llama, "eager", "model.cuda_graphs=false", decoder=True)
    a = [r["loss"] for r in read_rows(graphed.out_dir / "metrics.jsonl") if "loss" in r]
    b = [r["loss"] for r in read_rows(eager.out_dir / "metrics.jsonl") if "loss" in r]
    assert len(a) == len(b) == 6
    assert all(abs(x - y) / abs(y) < 2e-2 for x, y in zip(a, b)), (a, b)
