"""One micro-batch shape for loratune's decoder on CUDA: padding-free SFT streams are padded to the token budget
(`Resolved.pad_streams`, decided once in `loratune.model.resolve`), so compiled attention compiles once; the run's
batching follows the decision."""

from __future__ import annotations

from pathlib import Path

import torch

from loratune.config import load_config
from loratune.data.render import IGNORE
from loratune.data.sample import Sample
from loratune.model.memory import load_model_config
from loratune.model.resolve import decide
from loratune.train.run import make_batching


def _resolved(tiny_llama: Path, device: str, *overrides: str):
    cfg = load_config(None, [f"model.path={tiny_llama}", "data.max_length=64", *overrides])
    return cfg, decide(cfg, device, load_model_config(cfg))


def test_padded_streams_only_for_the_decoder_on_cuda(tiny_llama: Path) -> None:
    assert _resolved(tiny_llama, "cuda", "model.implementation=loratune")[1].pad_streams
    assert not _resolved(tiny_llama, "cpu", "model.implementation=loratune")[1].pad_streams
    assert not _resolved(tiny_llama, "cuda", "model.implementation=loratune", "train.batching=padded")[1].pad_streams
    assert not _resolved(tiny_llama, "cuda", "model.implementation=transformers")[1].pad_streams
    r = _resolved(tiny_llama, "cuda", "model.implementation=loratune", "train.tokens_per_batch=128")[1]
    assert "128 tokens (padded to that: one shape)" in r.describe()


def test_the_runs_batching_pads_every_stream_to_the_budget(tiny_llama: Path) -> None:
    cfg, r = _resolved(tiny_llama, "cuda", "model.implementation=loratune", "train.tokens_per_batch=96")
    batching = make_batching(cfg, r, pad_id=0)
    samples = [Sample(list(range(3, 3 + n)), [IGNORE] + list(range(4, 3 + n))) for n in (40, 30, 50, 20, 7)]
    batches = batching.micro_batches(samples, [[0, 1], [2, 3], [4]])
    assert [tuple(b["input_ids"].shape) for b in batches] == [(1, 96)] * len(batches)
    # every sample once (ids from 3 up; padding is id 0, unlabelled), every label kept
    assert sum(int((b["input_ids"] != 0).sum()) for b in batches) == 40 + 30 + 50 + 20 + 7
    assert sum(int((b["labels"] != IGNORE).sum()) for b in batches) == 39 + 29 + 49 + 19 + 6
    assert all(bool((b["labels"][b["input_ids"] == 0] == IGNORE).all()) for b in batches)
