"""HQQ bases (quantization.method hqq): the quantized layers, LoRA training on them, the adapter reloaded, resume.

All on CPU, on the tiny Llama (hidden 64, MLP 128: group sizes 32 and 64 divide every layer's input).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from torch import nn

pytest.importorskip("hqq")

from loratune.config import load_config  # noqa: E402
from loratune.data.sample import Sample  # noqa: E402
from loratune.errors import ConfigError, ModelError  # noqa: E402
from loratune.model.adapters import count_parameters, weight_precision  # noqa: E402
from loratune.model.hqq_base import bytes_per_weight, dequantize_hqq, hqq_layers, quantize_hqq  # noqa: E402
from loratune.model.load import load_base  # noqa: E402
from loratune.model.memory import load_model_config  # noqa: E402
from loratune.model.resolve import decide  # noqa: E402

sys.path.insert(0, str(Path(__file__).parents[1] / "train"))
from train_helpers import adapter_bytes, config, run_cli, write_run_yaml  # noqa: E402


def _cfg(model: Path, *overrides: str):
    return load_config(None, [f"model.path={model}", "quantization.method=hqq", "quantization.compute_dtype=fp32",
                              *overrides])


def _plain(model: Path) -> nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32)


def test_layers_quantize_to_fewer_bits_with_growing_error(tiny_llama: Path) -> None:
    plain = _plain(tiny_llama)
    weights = {n: m.weight.detach().clone() for n, m in plain.named_modules() if isinstance(m, nn.Linear)}
    errors = {}
    x = torch.randn(3, 64, generator=torch.Generator().manual_seed(0))
    for bits in (8, 4, 3, 2):
        model = _plain(tiny_llama)
        assert quantize_hqq(model, bits, 64, torch.float32, "cpu") == 14  # 7 per layer x 2; the head stays
        assert type(model.lm_head) is nn.Linear and len(hqq_layers(model)) == 14
        q = model.model.layers[0].self_attn.q_proj
        w = q.dequantize()
        assert torch.equal(q(x), x @ w.t())  # the layer computes with exactly its dequantized weight
        rel = [float((m.dequantize() - weights[n]).norm() / weights[n].norm()) for n, m in model.named_modules()
               if n in weights and n != "lm_head"]
        errors[bits] = max(rel)
        trainable, total = count_parameters(model)
        assert total == sum(p.numel() for p in plain.parameters())  # packed weights counted as what they hold
        assert weight_precision(model) == f"{bits}-bit HQQ (groups of 64)"
    # worst relative error of a layer's weights: 8-bit is close to exact, each bit fewer costs accuracy (measured
    # on these random weights: 0.005, 0.089, 0.189, 0.438)
    assert errors[8] < 0.01 < errors[4] < 0.12 < errors[3] < 0.25 < errors[2] < 0.55, errors


def test_dequantized_base_holds_the_quantized_weights(tiny_llama: Path) -> None:
    model = _plain(tiny_llama)
    quantize_hqq(model, 4, 32, torch.float32, "cpu")
    want = model.model.layers[1].mlp.down_proj.dequantize()
    ids = torch.tensor([[3, 17, 99, 250, 4]])
    with torch.no_grad():
        before = model(input_ids=ids).logits
    assert dequantize_hqq(model, torch.float32) == 14 and not hqq_layers(model)
    assert type(model.model.layers[1].mlp.down_proj) is nn.Linear
    assert torch.equal(model.model.layers[1].mlp.down_proj.weight, want)
    with torch.no_grad():
        assert torch.allclose(model(input_ids=ids).logits, before, atol=1e-5, rtol=0)


def test_bytes_per_weight() -> None:
    assert bytes_per_weight(4, 64, 2) == pytest.approx(0.5 + 4 / 64)  # 4 bits + bf16 scale and zero per 64
    assert bytes_per_weight(3, 64, 2) == pytest.approx(0.4 + 4 / 64)  # ten 3-bit values per int32
    assert bytes_per_weight(2, 16, 4) == pytest.approx(0.25 + 8 / 16)


def test_group_size_that_does_not_divide_is_named(tiny_llama: Path) -> None:
    with pytest.raises(ModelError, match="group_size 48 does not divide the input size 64 of model.layers.0"):
        load_base(_cfg(tiny_llama, "quantization.group_size=48"))


@pytest.mark.parametrize("overrides, message", [
    (["quantization.method=bitsandbytes", "quantization.bits=2"], "quantization.bits 2 needs quantization.method hqq"),
    (["quantization.bits=16"], "quantization.method hqq needs quantization.bits 2, 3, 4 or 8, got 16"),
    (["quantization.group_size=0"], "quantization.group_size must be >= 1, got 0"),
    (["adapter.type=none", "quantization.bits=3"], "needs quantization.bits 16 or 32, got 3"),
    (["adapter.init=loftq"], "adapter.init loftq absorbs bitsandbytes' NF4 quantization error"),
    (["train.strategy=fsdp"], "quantization.method hqq does not run under train.strategy fsdp"),
    (["adapter.init=pissa", "quantization.bits=3"], "which a 3-bit base cannot hold exactly"),
])
def test_config_errors(tiny_llama: Path, overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        _cfg(tiny_llama, *overrides)


def test_auto_trains_an_hqq_base_through_transformers_and_peft(tiny_llama: Path) -> None:
    cfg = _cfg(tiny_llama, "quantization.bits=3")
    r = decide(cfg, "cpu", load_model_config(cfg))
    assert r.implementation == "transformers" and "quantization.method=hqq" in r.why
    assert r.checkpointing  # on by default for a quantized base, as for 4-bit NF4
    with pytest.raises(ModelError, match="HQQ base"):
        decide(_cfg(tiny_llama, "model.implementation=loratune"), "cpu", load_model_config(cfg))


def _samples() -> list[Sample]:
    g = torch.Generator().manual_seed(1)
    out = []
    for i in range(8):
        ids = torch.randint(5, 400, (24,), generator=g).tolist()
        out.append(Sample(ids, [-100] * 4 + ids[4:]))
    return out


@pytest.mark.parametrize("bits", [4, pytest.param(2, marks=pytest.mark.slow)])
def test_lora_on_hqq_lowers_the_loss_and_reloads_with_peft(tiny_llama: Path, tmp_path: Path, bits: int) -> None:
    """Six steps on a fixed set lower its loss, step by step; the saved adapter on a freshly quantized base (peft's own
    `PeftModel.from_pretrained`) gives the trained model's logits: the same HQQ weights (HQQ's quantization is
    deterministic) and the same adapter weights through the same ops, so they agree to float32 rounding."""
    from peft import PeftModel
    from train_helpers import build_loop

    from loratune.train.loop import LoopState
    from loratune.train.loss import full_logits_loss_sum, with_target_rows

    samples = _samples()
    loop = build_loop(tiny_llama, samples, "quantization.method=hqq", f"quantization.bits={bits}",
                      "quantization.compute_dtype=fp32", "adapter.rank=8", "adapter.dropout=0",
                      "train.batching=padded", "train.batch_size=8", "train.grad_accum=1", "train.max_steps=6",
                      "train.optimizer=adamw", "train.lr=1e-2", "data.max_length=32", random_adapters=False)
    model = loop.runner.module
    assert len(hqq_layers(model)) == 14

    def loss(batches) -> float:
        with torch.no_grad():
            sums = [full_logits_loss_sum(model, with_target_rows(b)) for b in batches]
        return sum(float(s) for s, _ in sums) / sum(n for _, n in sums)

    state = LoopState()
    windows = loop.windows(state)
    losses = []
    for _ in range(6):
        _, _, window = next(windows)
        batches = loop.batches(window)
        losses.append(loss(batches))
        assert not loop.step(state, window).skipped
    losses.append(loss(batches))
    # every step lowers the loss on the set it trains on (measured: 6.36 -> 5.19 at 4-bit, 6.35 -> 5.26 at 2-bit)
    assert all(b < a for a, b in zip(losses, losses[1:])) and losses[-1] < losses[0] - 0.5, losses

    model.save_pretrained(tmp_path / "adapter")
    ids = torch.tensor([s.input_ids for s in samples[:2]])
    model.eval()
    with torch.no_grad():
        trained = model(input_ids=ids).logits
    cfg = _cfg(tiny_llama, f"quantization.bits={bits}")
    reloaded = PeftModel.from_pretrained(load_base(cfg), str(tmp_path / "adapter")).eval()
    assert len(hqq_layers(reloaded)) == 14
    with torch.no_grad():
        again = reloaded(input_ids=ids).logits
    assert (again - trained).abs().max() <= 1e-6 * trained.abs().max()  # measured: 0 (bit-identical)


@pytest.mark.slow
def test_cli_run_on_3bit_hqq_resumes_to_the_same_adapter(tiny_llama: Path, tmp_path: Path) -> None:
    """`loratune train` on a 3-bit HQQ base: the eval loss falls, a run killed mid-step 5 (after the checkpoint at
    step 3) resumes to the uninterrupted run's adapter, byte for byte; `loratune chat`'s engine answers with the
    trained logits exactly, and `loratune export` merges it."""
    from loratune.train.metrics import read_rows
    from loratune.train.run import train

    sections = {"quantization": {"method": "hqq", "bits": 3, "compute_dtype": "fp32"},
                "train": {"optimizer": "adamw"}}
    ref = tmp_path / "ref"
    ref.mkdir()
    result = train(config(write_run_yaml(ref, tiny_llama, **sections)))
    evals = [r["eval_loss"] for r in read_rows(result.out_dir / "metrics.jsonl") if "eval_loss" in r]
    assert len(evals) == 3 and evals[0] > evals[1] > evals[2], evals
    want = adapter_bytes(result.out_dir)

    path = write_run_yaml(tmp_path, tiny_llama, **sections)
    p = run_cli(path, fault="kill@step.backward#5")
    assert p.returncode == -9, p.stderr[-3000:]
    p = run_cli(path)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "resuming from" in p.stderr and "training done: 8 steps" in p.stdout and "3-bit HQQ" in p.stdout
    out = tmp_path / "out"
    assert adapter_bytes(out) == want

    # what `loratune chat` answers with: the run's base quantized again with HQQ, its adapter on, as trained
    from peft import PeftModel

    from loratune.export.merge import export
    from loratune.infer.load import load_engine

    ids = torch.tensor([[3, 17, 99, 250, 4, 77, 12]])
    cfg = config(path)
    with torch.no_grad():
        want_logits = PeftModel.from_pretrained(load_base(cfg), str(out)).eval()(input_ids=ids).logits
        engine = load_engine([str(out)], implementation="transformers")
        with engine.use() as model:
            assert len(hqq_layers(model)) == 14
            assert torch.equal(model(input_ids=ids).logits, want_logits)
    # `loratune export`: merged into the dequantized HQQ weights, in fp32 it follows the adapter closely
    report = export(out, tmp_path / "merged", dtype="fp32")
    assert report.merged_vs_adapter.top1 == 1.0 and report.merged_vs_adapter.max_diff < 1e-4
    assert report.adapter_dequant_vs_trained.max_diff < 1e-4 and report.reload_max_diff == 0


@pytest.mark.parametrize("bits, group, slack", [(4, 64, 0.0), (2, 32, 0.0), (3, 64, 0.1)])
def test_memory_plan_counts_the_bytes_hqq_holds(tiny_llama: Path, bits: int, group: int, slack: float) -> None:
    """The plan's decoder weights and quantization constants are what the quantized layers hold: packed values,
    and a scale and zero per group in the compute dtype. 3-bit packs ten values per int32 along the rows, so a
    row count that ten does not divide (64 here) pads up to 10% more; at real sizes it is <1%."""
    from loratune.model.memory import estimate

    cfg = _cfg(tiny_llama, f"quantization.bits={bits}", f"quantization.group_size={group}")
    model = load_base(cfg)
    layers = [model.get_submodule(n) for n in hqq_layers(model)]
    packed = sum(m.W_q.nbytes for m in layers)
    consts = sum(m.meta["scale"].nbytes + m.meta["zero"].nbytes for m in layers)
    plan = {c.name: c.bytes for c in estimate(cfg, load_model_config(cfg), 1, 32, "cpu").components}
    assert plan["quantization constants"] == consts
    assert plan["decoder weights"] <= packed <= plan["decoder weights"] * (1 + slack)


@pytest.mark.parametrize("method, message", [
    ("gptq", "is a GPTQ checkpoint (config.json's quantization_config); loading it through transformers needs "),
    ("awq", "is a AWQ checkpoint"),
    ("fp8", "quant_method 'fp8'; loratune trains on checkpoints saved with awq, bitsandbytes, gptq"),
])
def test_prequantized_checkpoint_without_its_packages_is_named(tiny_llama: Path, tmp_path: Path, method: str,
                                                                message: str) -> None:
    """A checkpoint saved GPTQ/AWQ-quantized (config.json's quantization_config) loads through transformers'
    integrations, which need GPT-QModel (and optimum for GPTQ): without them the run stops before loading, saying
    what to install; the plan sends it to transformers + peft (loratune's decoder reads bitsandbytes only)."""
    import importlib.util
    import json
    import shutil

    from loratune.model.prequantized import NEEDS

    if NEEDS.get(method) and all(importlib.util.find_spec(p) for p in NEEDS[method]):
        pytest.skip(f"the packages for {method} are installed here")
    folder = tmp_path / "quantized"
    shutil.copytree(tiny_llama, folder)
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"] = {"quant_method": method, "bits": 4, "group_size": 128}
    (folder / "config.json").write_text(json.dumps(config))
    cfg = load_config(None, [f"model.path={folder}"])
    with pytest.raises(ModelError, match=message.replace("(", r"\(").replace(")", r"\)")) as e:
        load_base(cfg)
    if method != "fp8":
        missing = [p for p in NEEDS[method] if importlib.util.find_spec(p) is None]
        assert f"pip install {' '.join(missing)} " in str(e.value)
    r = decide(cfg, "cpu", load_model_config(cfg))
    assert r.implementation == "transformers" and f"saved {method.upper()}-quantized" in r.why
