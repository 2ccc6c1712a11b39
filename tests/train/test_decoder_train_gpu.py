"""Training on loratune's decoder on a GPU: padding-free streams through flash-attn or FlexAttention, the same
steps as padded rows and as transformers + peft, runs that train and write the adapter peft loads.

Run on the GPU machine: `python -m pytest tests/train/test_decoder_train_gpu.py -q -m gpu`. Skipped without CUDA.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from peft import PeftModel
from train_helpers import build_loop, config, write_run_yaml

from loratune.data.render import IGNORE
from loratune.data.sample import Sample
from loratune.decoder import Boundaries, load_adapter
from loratune.decoder.attention import resolve_backend
from loratune.model.build import build_trainable
from loratune.model.load import load_base
from loratune.model.memory import load_model_config
from loratune.model.resolve import decide
from loratune.train.metrics import read_rows
from loratune.train.run import train

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
              pytest.mark.usefixtures("exact_cuda_matmuls")]

OVERRIDES = ("adapter.rank=4", "adapter.dropout=0", "data.max_length=64", "train.batch_size=2", "train.grad_accum=4",
             "train.optimizer=adamw")
WINDOW = [[7, 0], [3, 5], [1, 6], [2, 4]]


def _samples() -> list[Sample]:
    g = torch.Generator().manual_seed(0)
    out = []
    for i, n in enumerate((5, 9, 13, 17, 21, 25, 29, 33)):
        ids = torch.randint(5, 400, (n,), generator=g).tolist()
        out.append(Sample(ids, [IGNORE] * (2 + i % 3) + ids[2 + i % 3:]))
    return out


def _step(loop) -> tuple[float, dict[str, torch.Tensor]]:
    loss, _ = loop.forward_backward(loop.batches(WINDOW))
    return loss, {k: p.grad.float().clone() for k, p in loop.runner.module.named_parameters() if p.requires_grad}


def _rel(a: dict, b: dict) -> float:
    return max(float((a[k] - b[k]).abs().max() / b[k].abs().max()) for k in b)


@pytest.mark.parametrize(("dtype", "tol"), [("fp32", 1e-5), ("bf16", 2e-2)])
def test_padding_free_equals_padded_on_the_gpu(tiny_llama: Path, dtype: str, tol: float) -> None:
    """FlexAttention (or flash-attn in bf16) over the stream against padded rows: the same loss and gradients."""
    common = (*OVERRIDES, f"quantization.compute_dtype={dtype}", "model.implementation=loratune")
    free = build_loop(tiny_llama, _samples(), *common, "train.tokens_per_batch=66")
    padded = build_loop(tiny_llama, _samples(), *common, "train.batching=padded")
    backend = resolve_backend("auto", torch.device("cuda"), free.runner.module.compute_dtype)
    assert backend in ("flash", "flex")
    loss_f, g_f = _step(free)
    loss_p, g_p = _step(padded)
    assert loss_f == pytest.approx(loss_p, rel=tol) and _rel(g_f, g_p) < tol * 10


@pytest.mark.parametrize(("dtype", "tol"), [("fp32", 1e-4), ("bf16", 2e-2)])
def test_the_decoder_steps_as_transformers_and_peft_on_the_gpu(tiny_llama: Path, dtype: str, tol: float) -> None:
    common = (*OVERRIDES, f"quantization.compute_dtype={dtype}")
    ours = build_loop(tiny_llama, _samples(), *common, "model.implementation=loratune")
    theirs = build_loop(tiny_llama, _samples(), *common, "model.implementation=transformers")
    loss_o, g_o = _step(ours)
    loss_t, g_t = _step(theirs)
    g_t = {k.replace("base_model.model.model.", "").replace("self_attn", "attn").replace(".default.weight", ""): v
           for k, v in g_t.items()}
    assert loss_o == pytest.approx(loss_t, rel=tol) and _rel(g_o, g_t) < tol * 10


def test_a_bf16_run_on_the_decoder_trains_and_its_adapter_loads_in_peft(tmp_path: Path, tiny_llama: Path) -> None:
    cfg = config(write_run_yaml(tmp_path, tiny_llama), "quantization.compute_dtype=bf16", "train.max_steps=16",
                 "train.lr=1e-2", "train.deterministic=false", "model.implementation=loratune")
    result = train(cfg)
    losses = [r["loss"] for r in read_rows(result.out_dir / "metrics.jsonl") if "loss" in r]
    assert len(losses) == 16 and sum(losses[-4:]) < sum(losses[:4])
    ids = torch.tensor([[1, 17, 93, 5, 260, 41, 8, 77]], device="cuda")
    with torch.no_grad():
        peft_model = PeftModel.from_pretrained(load_base(cfg), result.out_dir).eval()
        theirs = peft_model(input_ids=ids).logits[0].float()
        dec = build_trainable(cfg, decide(cfg, "cuda", load_model_config(cfg))).module.eval()
        load_adapter(dec, result.out_dir)
        ours = dec(ids[0], Boundaries.from_lengths([ids.shape[1]], "cuda")).float()
    assert (ours - theirs).abs().max().item() < 0.1 * theirs.abs().max().item()  # bf16 products on both sides
    assert (ours.argmax(-1) == theirs.argmax(-1)).float().mean().item() >= 0.75
