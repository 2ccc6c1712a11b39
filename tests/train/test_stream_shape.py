"""One micro-batch shape for loratune's decoder on CUDA: padding-free SFT streams are padded to the token budget
(`Resolved.pad_streams`, decided once in `loratune.model.resolve`), so compiled attention compiles once; the run's
batching follows the decision."""

from __future__ import annotations

from pathlib import Path

import pytest
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


def test_cuda_graphs_for_the_decoders_fixed_shape_streams(tiny_llama: Path) -> None:
    assert _resolved(tiny_llama, "cuda", "model.implementation=loratune", "adapter.dropout=0")[1].graphs
    assert not _resolved(tiny_llama, "cpu", "model.implementation=loratune", "adapter.dropout=0")[1].graphs
    for off in ("train.batching=padded", "model.cuda_graphs=false", "train.deterministic=true",
                "train.neftune_alpha=5"):
        assert not _resolved(tiny_llama, "cuda", "model.implementation=loratune", "adapter.dropout=0", off)[1].graphs, off
    # adapter dropout is replayed (its masks reseeded per micro-batch: loratune.train.dropout_seeds) when asked for;
    # auto keeps such a run eager until the replay is measured on a GPU
    assert not _resolved(tiny_llama, "cuda", "model.implementation=loratune", "adapter.dropout=0.1")[1].graphs
    assert _resolved(tiny_llama, "cuda", "model.implementation=loratune", "adapter.dropout=0.1",
                     "model.cuda_graphs=true")[1].graphs
    # the transformers fallback runs as the libraries ship: never graphed, never our kernels
    for batching in ("padded", "padding_free"):
        r = _resolved(tiny_llama, "cuda", "model.implementation=transformers", "adapter.dropout=0",
                      f"train.batching={batching}")[1]
        assert not r.graphs and not r.kernels and not r.fused_mlp


def test_the_graphed_loss_is_the_eager_loss_of_a_padded_stream(tiny_llama: Path) -> None:
    """`decoder_stream_loss_sum` (boundaries on the device, every row through the head: what a graph captures)
    gives the eager runner's summed loss and gradients for a stream padded to its budget."""
    from loratune.train.runner import DecoderRunner, decoder_graphs, decoder_stream_loss_sum

    cfg, r = _resolved(tiny_llama, "cpu", "model.implementation=loratune", "train.tokens_per_batch=96",
                       "adapter.dropout=0")
    from loratune.model.build import build_trainable

    torch.manual_seed(0)
    decoder = build_trainable(cfg, r).module
    for name, p in decoder.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.05)
    samples = [Sample(list(range(3, 3 + n)), [IGNORE] + list(range(4, 3 + n))) for n in (40, 30, 7)]
    from loratune.data.collate import Batching

    batch = Batching(True, 1, 96, pad_id=0, pad_to_budget=True).micro_batches(samples, [[0, 1, 2]])[0]
    assert batch["input_ids"].shape == (1, 96)
    runner = DecoderRunner(decoder, torch.device("cpu"))
    assert decoder_graphs(decoder) is None  # no CUDA here

    def grads():
        out = {n: p.grad.clone() for n, p in decoder.named_parameters() if p.requires_grad}
        decoder.zero_grad(set_to_none=True)
        return out

    with decoder.frozen_adapters():
        eager, n = runner.loss_sum(batch)
        eager.backward()
    g_eager = grads()
    with decoder.frozen_adapters():
        graphed = decoder_stream_loss_sum(decoder, batch)
        graphed.backward()
    g_graphed = grads()
    assert n == 39 + 29 + 6
    assert float(graphed.detach()) == pytest.approx(float(eager.detach()), rel=1e-6)
    assert max(float((g_graphed[k] - g_eager[k]).abs().max() / g_eager[k].abs().max()) for k in g_eager) < 1e-5


def test_the_graph_policy_takes_streams_of_the_decoder() -> None:
    from loratune.kernels.graphs import GraphedMicroBatch

    g = GraphedMicroBatch(torch.nn.Linear(2, 2), lambda m, b: b["input_ids"].sum())
    g.enabled = True  # as on a GPU
    stream = {k: torch.zeros(1, 8, dtype=torch.long) for k in ("input_ids", "labels", "position_ids")}
    assert g._key(stream) == ((1, 8), ("input_ids", "labels", "position_ids"))
    assert g._key({**stream, "attention_mask": torch.ones(1, 8)}) is None
    assert g._key({k: v for k, v in stream.items() if k != "position_ids"}) is None
