"""LoRA on quantized bases on a CUDA GPU: HQQ (quantized at load, straight onto the GPU) and a GPTQ checkpoint
(quantized here with transformers' GPTQConfig, saved, and trained from the saved folder).

The GPTQ test needs GPT-QModel and optimum (`pip install gptqmodel optimum`; GPT-QModel 7.7 needs torch >= 2.14.1)
and is skipped without them. Run on the GPU machine:
`python -m pytest tests/model/test_prequantized_gpu.py -q -m gpu -s`.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

from loratune.data.sample import Sample

sys.path.insert(0, str(Path(__file__).parents[1] / "train"))
from train_helpers import build_loop  # noqa: E402

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def _samples() -> list[Sample]:
    g = torch.Generator().manual_seed(1)
    out = []
    for _ in range(8):
        ids = torch.randint(5, 400, (24,), generator=g).tolist()
        out.append(Sample(ids, [-100] * 4 + ids[4:]))
    return out


def _train_and_reload(model_path: Path, tmp_path: Path, load_base_again, *overrides: str) -> tuple[list[float], float]:
    """Six steps of LoRA through `loratune train`'s loop on `model_path`; (the loss before each step and after the
    last, max |logit difference| of the saved adapter on a freshly loaded base against the trained model)."""
    from peft import PeftModel

    from loratune.train.loop import LoopState
    from loratune.train.loss import full_logits_loss_sum, with_target_rows

    samples = _samples()
    loop = build_loop(model_path, samples, *overrides, "adapter.rank=8", "adapter.dropout=0", "train.batching=padded",
                      "train.batch_size=8", "train.grad_accum=1", "train.max_steps=6", "train.optimizer=adamw",
                      "train.lr=1e-2", "data.max_length=32", random_adapters=False)
    model = loop.runner.module

    def loss(batches) -> float:
        with torch.no_grad():
            sums = [full_logits_loss_sum(model, with_target_rows(b)) for b in batches]
        return sum(float(s) for s, _ in sums) / sum(n for _, n in sums)

    state, losses = LoopState(), []
    windows = loop.windows(state)
    for _ in range(6):
        _, _, window = next(windows)
        batches = loop.batches(window)
        losses.append(loss(batches))
        assert not loop.step(state, window).skipped
    losses.append(loss(batches))
    model.save_pretrained(tmp_path / "adapter")
    ids = torch.tensor([s.input_ids for s in samples[:2]], device="cuda")
    model.eval()
    with torch.no_grad():
        trained = model(input_ids=ids).logits.float()
        reloaded = PeftModel.from_pretrained(load_base_again(), str(tmp_path / "adapter")).eval()
        again = reloaded(input_ids=ids).logits.float()
    return losses, float((again - trained).abs().max() / trained.abs().max())


@pytest.mark.skipif(importlib.util.find_spec("hqq") is None, reason="needs hqq (pip install 'loratune[hqq]')")
@pytest.mark.parametrize("bits", [4, 3])
def test_hqq_base_on_the_gpu(tiny_llama: Path, tmp_path: Path, bits: int) -> None:
    from loratune.config import load_config
    from loratune.model.hqq_base import hqq_layers
    from loratune.model.load import load_base

    overrides = ["quantization.method=hqq", f"quantization.bits={bits}", "quantization.compute_dtype=bf16"]
    cfg = load_config(None, [f"model.path={tiny_llama}", *overrides])
    base = load_base(cfg)
    layers = [base.get_submodule(n) for n in hqq_layers(base)]
    assert len(layers) == 14 and all(m.W_q.is_cuda for m in layers)
    assert all(p.is_cuda for p in base.parameters())
    losses, diff = _train_and_reload(tiny_llama, tmp_path, lambda: load_base(cfg), *overrides)
    assert all(b < a for a, b in zip(losses, losses[1:])), losses
    assert diff <= 1e-2, diff  # bf16 compute: the same weights and ops; measured on CPU in fp32: 0


@pytest.mark.skipif(any(importlib.util.find_spec(p) is None for p in ("gptqmodel", "optimum")),
                    reason="needs gptqmodel and optimum")
def test_gptq_checkpoint_trains_and_reloads(tiny_llama: Path, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer, GPTQConfig

    from loratune.model.prequantized import saved_quant_method

    tok = AutoTokenizer.from_pretrained(tiny_llama)
    texts = [line for line in (Path(__file__).parents[2] / "src/loratune/model/tiny_corpus.txt").read_text()
             .splitlines() if len(line) > 40][:64]
    gptq = AutoModelForCausalLM.from_pretrained(
        tiny_llama, dtype=torch.float16, device_map={"": 0},
        quantization_config=GPTQConfig(bits=4, group_size=32, dataset=texts, tokenizer=tok))
    folder = tmp_path / "gptq"
    gptq.save_pretrained(folder)
    tok.save_pretrained(folder)
    del gptq
    assert saved_quant_method(folder) == "gptq"
    losses, diff = _train_and_reload(folder, tmp_path, lambda: AutoModelForCausalLM.from_pretrained(
        folder, dtype=torch.float16, device_map={"": 0}), "quantization.compute_dtype=fp16")
    assert losses[-1] < losses[0] - 0.1, losses
    assert diff <= 1e-2, diff
