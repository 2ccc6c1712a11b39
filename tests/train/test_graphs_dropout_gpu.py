"""Adapter dropout inside CUDA graphs (loratune.kernels.graphs, loratune.train.dropout_seeds) on the GPU: a replayed
micro-batch draws the masks its eager pass draws (same gradients), a graphed run with dropout 0.1 trains as the
eager run does, and a graphed dropout run killed and resumed ends with the uninterrupted run's adapter.

Run on the GPU machine: `python -m pytest tests/train/test_graphs_dropout_gpu.py -q -m gpu`. Skipped without CUDA.
"""

from __future__ import annotations

import logging
import random
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from train_helpers import build_loop, config, run_cli, write_run_yaml

from loratune.data.sample import Sample
from loratune.train.metrics import read_rows
from loratune.train.run import train

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

WORDS = "the model learns to answer questions about quantization adapters memory and training data".split()
WINDOW = [[0, 1], [2, 3]]  # four 40-token samples: two streams of 80 tokens, one shape


def _samples() -> list[Sample]:
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(4):
        ids = torch.randint(5, 400, (40,), generator=g).tolist()
        out.append(Sample(ids, [-100] * 4 + ids[4:]))
    return out


def _loop(model: Path, *overrides: str):
    return build_loop(model, _samples(), "adapter.rank=4", "adapter.dropout=0.1",
                      "model.implementation=loratune", "quantization.compute_dtype=fp32", "data.max_length=64",
                      "train.batch_size=2", "train.grad_accum=2", "train.tokens_per_batch=80",
                      "train.deterministic=false", "train.optimizer=adamw", *overrides)


def _step_grads(loop, step: int) -> tuple[float, dict[str, torch.Tensor]]:
    loop.optimizer.zero_grad(set_to_none=True)
    loss, _ = loop.forward_backward(loop.batches(WINDOW), step=step)
    return loss, {n: p.grad.float().clone() for n, p in loop.runner.module.named_parameters() if p.requires_grad}


@pytest.mark.usefixtures("exact_cuda_matmuls")
def test_a_replayed_micro_batch_draws_the_eager_masks(tiny_llama: Path, caplog) -> None:
    """fp32: step 3's loss and gradients by graph replay equal the eager loop's (1e-5); with other masks (step 4)
    they would differ by far more, and do."""
    caplog.set_level(logging.INFO, logger="loratune.kernels.graphs")
    graphed = _loop(tiny_llama)
    eager = _loop(tiny_llama, "model.cuda_graphs=false")
    assert graphed.graphs is not None and eager.graphs is None and graphed.seeds is not None
    graphed.runner.module.train()
    eager.runner.module.train()
    for step in range(3):  # micro-batches 1-2 eager, 3 captured (warm-up, timed replay), then replays
        _step_grads(graphed, step)
    assert graphed.graphs.graph is not None, caplog.text
    replays = graphed.graphs.replays
    loss_g, grads_g = _step_grads(graphed, 3)
    assert graphed.graphs.replays == replays + 2  # both micro-batches of step 3 replayed
    loss_e, grads_e = _step_grads(eager, 3)
    assert abs(loss_g - loss_e) <= 1e-5 * abs(loss_e), (loss_g, loss_e)
    rel = max(float((grads_g[k] - grads_e[k]).abs().max() / grads_e[k].abs().max()) for k in grads_e)
    assert rel < 1e-4, rel
    loss_other, grads_other = _step_grads(eager, 4)
    other = max(float((grads_other[k] - grads_e[k]).abs().max() / grads_e[k].abs().max()) for k in grads_e)
    assert other > 1e-2 and loss_other != loss_e  # the masks matter: the agreement above is not trivial


def _text_run(tmp_path: Path, tiny_llama: Path, name: str, *overrides: str):
    data = tmp_path / "corpus.txt"
    if not data.exists():
        rng = random.Random(0)
        data.write_text(" ".join(rng.choice(WORDS) for _ in range(6000)) + "\n")
    folder = tmp_path / name
    folder.mkdir()
    return folder, _sections(data)


def _sections(data: Path) -> dict:
    return {"adapter": {"rank": 4, "alpha": 8, "dropout": 0.1},
            "data": {"datasets": [{"path": str(data), "format": "text"}], "max_length": 64, "eval_split": 0},
            "train": {"max_steps": 8, "batch_size": 2, "grad_accum": 2, "deterministic": False, "save_every": 3,
                      "optimizer": "adamw"}}


CODE = ("quantization.compute_dtype=bf16", "model.implementation=loratune", "train.tokens_per_batch=160")


def test_a_graphed_dropout_run_trains_like_the_eager_run(tmp_path: Path, tiny_llama: Path, caplog, capsys) -> None:
    """bf16, dropout 0.1, 8 steps of two 160-token streams: graphed (captured once) and eager losses within bf16
    rounding; the dropout-free run's losses are further away (dropout is on in the graph)."""
    caplog.set_level(logging.INFO, logger="loratune.kernels.graphs")
    losses = {}
    for name, extra in (("graphs", ()), ("eager", ("model.cuda_graphs=false",)), ("nodrop", ("adapter.dropout=0",))):
        folder, sections = _text_run(tmp_path, tiny_llama, name)
        run = train(config(write_run_yaml(folder, tiny_llama, **sections), *CODE, *extra))
        losses[name] = [r["loss"] for r in read_rows(run.out_dir / "metrics.jsonl") if "loss" in r]
        if name == "graphs":
            assert "capture failed" not in caplog.text and "captured a CUDA graph" in caplog.text, caplog.text
            assert "micro-batches replayed" in capsys.readouterr().out
    a, b, c = losses["graphs"], losses["eager"], losses["nodrop"]
    assert len(a) == len(b) == len(c) == 8
    close = max(abs(x - y) / abs(y) for x, y in zip(a, b))
    apart = max(abs(x - y) / abs(y) for x, y in zip(c, b))
    assert close < 1e-2, (a, b)
    assert apart > close, (a, b, c)


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert set(a) == set(b)
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


def test_a_graphed_dropout_run_killed_and_resumed_ends_with_the_same_adapter(tmp_path: Path,
                                                                               tiny_llama: Path) -> None:
    """Killed at the end of step 5 (resumes from 3) and right after step 6's checkpoint (resumes from 6): each
    process captures its graph at other micro-batches than the uninterrupted run, which must not change a mask.
    Byte for byte where two uninterrupted runs are (no atomic adds in the kernels: flash-attn's backward has
    them unless deterministic); else within the run-to-run difference, far below what other masks make."""
    runs = {}
    for name, extra in (("ref", ()), ("again", ()), ("seed", ("train.seed=7",))):
        folder, sections = _text_run(tmp_path, tiny_llama, name)
        out = train(config(write_run_yaml(folder, tiny_llama, **sections), *CODE, *extra)).out_dir
        runs[name] = load_file(str(out / "adapter_model.safetensors"))
    path = write_run_yaml(tmp_path, tiny_llama, **_sections(tmp_path / "corpus.txt"))
    for fault in ("kill@step.end#5", "kill@save.rotated#1"):
        p = run_cli(path, *CODE, fault=fault)
        assert p.returncode == -9, (fault, p.returncode, p.stderr[-3000:])
    done = run_cli(path, *CODE)
    assert done.returncode == 0 and "resuming from" in done.stderr, done.stderr[-3000:]
    assert "micro-batches replayed" in done.stdout
    got = load_file(str(tmp_path / "out" / "adapter_model.safetensors"))
    noise, other = _max_diff(runs["again"], runs["ref"]), _max_diff(runs["seed"], runs["ref"])
    diff = _max_diff(got, runs["ref"])
    if noise == 0:
        assert diff == 0, (diff, other)
    else:
        assert diff <= 10 * noise < other, (diff, noise, other)
