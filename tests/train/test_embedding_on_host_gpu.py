"""model.embedding_on_host on the GPU: the table stays in host memory, graphed micro-batches take the rows gathered
on the host as a static input (loratune.train.runner.host_embeds), and training is the same as with the table on
the GPU.

Run on the GPU machine: `python -m pytest tests/train/test_embedding_on_host_gpu.py -q -m gpu`. Skipped without CUDA.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from train_helpers import build_loop

from loratune.data.sample import Sample
from loratune.train.runner import EMBEDS

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

WINDOW = [[0, 1], [2, 3]]  # four 40-token samples: two streams of 80 tokens, one shape


def _samples() -> list[Sample]:
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(4):
        ids = torch.randint(5, 400, (40,), generator=g).tolist()
        out.append(Sample(ids, [-100] * 4 + ids[4:]))
    return out


def _loop(model: Path, on: str):
    return build_loop(model, _samples(), "adapter.rank=4", "adapter.dropout=0", "model.implementation=loratune",
                      "quantization.compute_dtype=bf16", f"model.embedding_on_host={on}", "data.max_length=64",
                      "train.batch_size=2", "train.grad_accum=2", "train.tokens_per_batch=80",
                      "train.deterministic=false", "train.optimizer=adamw")


def _step(loop, step: int) -> tuple[float, dict[str, torch.Tensor]]:
    loop.optimizer.zero_grad(set_to_none=True)
    loss, _ = loop.forward_backward(loop.batches(WINDOW), step=step)
    return loss, {n: p.grad.float().clone() for n, p in loop.runner.module.named_parameters() if p.requires_grad}


def test_graphed_micro_batches_take_the_host_rows_and_train_the_same(tiny_llama: Path) -> None:
    host, dev = _loop(tiny_llama, "true"), _loop(tiny_llama, "false")
    assert host.runner.module.embed.weight.device.type == "cpu"
    assert dev.runner.module.embed.weight.is_cuda
    for loop in (host, dev):
        loop.runner.module.train()
        for step in range(3):  # 1-2 eager, 3 captured, then replays
            _step(loop, step)
        assert loop.graphs is not None and loop.graphs.graph is not None
    assert EMBEDS in host.graphs.static and EMBEDS not in dev.graphs.static
    replays = host.graphs.replays
    loss_h, g_h = _step(host, 3)
    loss_d, g_d = _step(dev, 3)
    assert host.graphs.replays == replays + 2
    assert loss_h == loss_d  # the same rows, the same kernels
    assert all(torch.equal(g_h[k], g_d[k]) for k in g_d)


def test_device_ids_are_refused_inside_a_capture(tiny_llama: Path) -> None:
    """The graphed decode step of generation captures `embed(tokens)` on device ids: refused there (the caller runs
    that step eagerly), read back outside a capture."""
    embed = _loop(tiny_llama, "true").runner.module.embed
    ids = torch.tensor([5, 9, 13], device="cuda")
    rows = embed(ids)
    assert rows.is_cuda and torch.equal(rows.cpu(), embed(ids.cpu()).cpu())
    graph = torch.cuda.CUDAGraph()
    with pytest.raises(RuntimeError, match="host memory"):
        with torch.cuda.graph(graph):
            embed(ids)
