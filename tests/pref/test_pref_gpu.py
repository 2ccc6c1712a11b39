"""Preference training on a GPU: the decoder's DPO and KTO steps (padding-free and padded) equal transformers +
peft's (the tolerances of tests/train/test_decoder_train_gpu.py), and a 4-bit bf16 DPO run raises the held-out
margin.

Run on the GPU machine: `python -m pytest tests/pref/test_pref_gpu.py -q -m gpu`. Skipped without CUDA.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from train_helpers import build_loop, config, write_run_yaml

from loratune.config import PreferenceConfig, load_config
from loratune.data.preference import prepare_preference_data
from loratune.model.load import load_tokenizer
from loratune.pref.batching import PreferenceBatching
from loratune.pref.objective import Preference
from loratune.train.metrics import read_rows
from loratune.train.run import train

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
              pytest.mark.usefixtures("exact_cuda_matmuls")]

PAIRS = Path(__file__).parents[2] / "examples" / "data" / "preference.jsonl"


def _step(model: Path, samples, code: str, batching: str, dtype: str, method: str):
    bits = "32" if dtype == "fp32" else "16"
    loop = build_loop(model, samples, "adapter.rank=4", "adapter.dropout=0", f"quantization.bits={bits}",
                      f"quantization.compute_dtype={dtype}", f"model.implementation={code}",
                      f"train.batching={batching}", "train.batch_size=4", "train.grad_accum=1", "train.optimizer=adamw",
                      f"train.method={method}")
    b = loop.batching
    loop.batching = PreferenceBatching(b.padding_free, b.batch_size, 2 * b.tokens, b.pad_id)
    loop.objective = Preference(method, PreferenceConfig())
    loss, n = loop.forward_backward(loop.batches([[0, 1, 2, 3]]))
    grads = {k: p.grad.float().clone() for k, p in loop.runner.module.named_parameters() if p.requires_grad}
    return loss / n, grads


def _hf_names(grads: dict) -> dict:
    """peft's parameter names as the decoder's (as tests/train/test_decoder_train_gpu.py maps them)."""
    return {k.replace("base_model.model.model.", "").replace("self_attn", "attn").replace(".default.weight", ""): v
            for k, v in grads.items()}


@pytest.mark.parametrize("method", ["dpo", "kto"])
@pytest.mark.parametrize(("dtype", "tol"), [("fp32", 1e-4), ("bf16", 2e-2)])
def test_decoder_step_equals_transformers(tiny_llama: Path, method: str, dtype: str, tol: float) -> None:
    data = PAIRS if method != "kto" else PAIRS.with_name("kto.jsonl")
    cfg = load_config(None, [f"model.path={tiny_llama}", f"data.datasets=[{{path: {data}, max_samples: 4}}]",
                             f"train.method={method}"])
    samples = prepare_preference_data(cfg.data, *load_tokenizer(cfg.model), 0, method, log_stats=False).train
    ref_loss, ref = _step(tiny_llama, samples, "transformers", "padded", dtype, method)
    ref = _hf_names(ref)
    for batching in ("padding_free", "padded"):
        loss, grads = _step(tiny_llama, samples, "loratune", batching, dtype, method)
        assert loss == pytest.approx(ref_loss, rel=tol), batching
        assert set(grads) == set(ref)
        worst = max(float((grads[k] - ref[k]).abs().max() / ref[k].abs().max()) for k in ref)
        assert worst < tol * 10, (batching, worst)


def test_a_4bit_bf16_dpo_run_raises_the_margin(tmp_path: Path, tiny_llama: Path) -> None:
    path = write_run_yaml(tmp_path, tiny_llama, data={"datasets": [{"path": str(PAIRS)}], "eval_split": 8},
                          train={"method": "dpo", "max_steps": 12, "eval_every": 4, "save_every": 0, "lr": 5e-3,
                                 "deterministic": False},
                          quantization={"bits": 4, "compute_dtype": "bf16"})
    result = train(config(path))
    evals = [r for r in read_rows(result.out_dir / "metrics.jsonl") if "eval_margin" in r]
    assert len(evals) == 3 and evals[-1]["eval_margin"] > evals[0]["eval_margin"] > 0
    assert (result.out_dir / "adapter_model.safetensors").is_file()
