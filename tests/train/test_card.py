"""The model card (README.md) a run writes in place of peft's template, checked against the run's real values;
the base weights' precision read from the weights (a full fine-tune is fp32, not "16-bit")."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import peft
import pytest
import torch
import transformers
import yaml
from safetensors.torch import load_file
from train_helpers import DATA, config, write_run_yaml
from transformers import AutoModelForCausalLM

from loratune.config import load_config
from loratune.data.pipeline import prepare_data
from loratune.data.stats import DataStats
from loratune.model.adapters import attach_adapters, weight_precision
from loratune.model.load import load_base, load_tokenizer
from loratune.model.resolve import ENV
from loratune.train.card import CardFacts, ModelFacts, is_hub_id, render
from loratune.train.checkpoint import checkpoint_name
from loratune.train.metrics import read_rows
from loratune.train.run import train

PROMPTS = ["What is NF4?", "Who are you?"]


def _front_matter(text: str) -> dict:
    assert text.startswith("---\n")
    return yaml.safe_load(text.split("---\n")[1])


def _python_block(text: str) -> str:
    return text.split("```python\n")[1].split("```")[0]


def _cell(text: str) -> str:
    return text.strip().replace("|", "\\|").replace("\r", "").replace("\n", "<br>") or "(empty)"


def test_the_output_folder_has_a_model_card_of_the_run(tmp_path: Path, tiny_llama: Path) -> None:
    cfg = config(write_run_yaml(tmp_path, tiny_llama, train={"plot": True},
                                output={"sample_prompts": PROMPTS, "sample_max_new_tokens": 4}))
    result = train(cfg)
    out = tmp_path / "out"
    text = (out / "README.md").read_text(encoding="utf-8")
    assert "More Information Needed" not in text  # peft's template is gone
    # a local base is no hub reference: no base_model in the front matter
    assert _front_matter(text) == {"library_name": "peft", "pipeline_tag": "text-generation",
                                   "tags": ["loratune", "text-generation", "lora", "qlora"]}
    assert f"A LoRA adapter for `{tiny_llama}`, trained with loratune." in text

    # method: the adapter as peft saved it, the parameters as the files hold them
    adapter = json.loads((out / "adapter_config.json").read_text())
    r, alpha, dropout = adapter["r"], adapter["lora_alpha"], adapter["lora_dropout"]
    assert (r, alpha, dropout) == (4, 8, 0.1)
    assert f"- LoRA: rank {r}, alpha {alpha:g} (update scale {alpha / r:g}), dropout {dropout:g}\n" in text
    assert "- Adapted modules: " + ", ".join(f"`{m}`" for m in sorted(adapter["target_modules"])) + "\n" in text
    assert ("- QLoRA: frozen base weights in 4-bit NF4, double-quantized, computing in fp32 "
            "(quantization.compute_dtype auto)\n") in text
    trainable = sum(t.numel() for t in load_file(str(out / "adapter_model.safetensors")).values())
    total = AutoModelForCausalLM.from_pretrained(tiny_llama).num_parameters() + trainable
    assert f"- Trainable parameters: {trainable:,} of {total:,} ({100 * trainable / total:.3f}%)\n" in text

    # data: the pipeline's own counts for this config
    tokenizer, info = load_tokenizer(cfg.model)
    stats = prepare_data(cfg.data, tokenizer, info, cfg.train.seed, log_stats=False).stats
    assert (stats.train_samples, stats.eval_samples) == (20, 4)
    ds = stats.datasets[0]
    assert f"| `{DATA}` | {ds.format} | {ds.records} | {ds.samples} | {ds.eval} | {ds.mixed} |\n" in text
    assert (f"- Training set: {stats.train_samples} samples in {stats.rows} rows, {stats.tokens:,} tokens, "
            f"{stats.supervised} of them supervised ({100 * stats.supervised / stats.tokens:.1f}%)\n") in text
    assert f"- Chat template: `{stats.template}`; loss on: assistant tokens; max length 128 tokens\n" in text

    # training settings and results: the run's record
    code = "transformers + peft" if os.environ.get(ENV) == "transformers" else "loratune's decoder"
    for row in ("| length | 8 steps |", f"| model code | {code} |",
                "| micro-batches | padding-free, up to 256 tokens each |", "| sequences per optimizer step | 4 |",
                "| learning rate | 0.003 |",
                "| schedule | cosine, warmup 2 steps |", "| optimizer | adamw |", "| seed | 42 |"):
        assert row + "\n" in text
    facts = json.loads((out / "loratune_run.json").read_text())
    rows = [row for row in read_rows(out / "metrics.jsonl") if "loss" in row]
    assert (facts["steps"], facts["tokens"]) == (8, result.tokens)
    assert (f"- Optimizer steps: 8 (1.60 epochs), {result.tokens:,} supervised tokens, "
            f"{facts['seconds']:.1f} s of training\n") in text
    assert (f"- Train loss: {rows[0]['loss']:.4f} (step 1) -> {rows[-1]['loss']:.4f} (step 8), each the mean loss "
            "per supervised token over those steps\n") in text
    best = f"{result.best_eval_loss:.4f}"
    assert f"- Eval loss: best {best} at step 8, last {best} at step 8\n" in text
    assert "![train and eval loss](loss.png)" in text and (out / "loss.png").is_file()

    samples = json.loads((out / "samples.json").read_text())["samples"]
    assert [s["prompt"] for s in samples] == PROMPTS
    for s in samples:
        assert f"| {_cell(s['prompt'])} | {_cell(s['before'])} | {_cell(s['after'])} |\n" in text

    for name, version in (("peft", peft.__version__), ("transformers", transformers.__version__),
                          ("torch", torch.__version__)):
        assert f"- {name} {version}\n" in text
    assert f"loratune chat {out}\n" in text

    # the Python snippet loads the adapter, as written
    code = _python_block(text) + "print(type(model).__name__, tokenizer.chat_template is not None)\n"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "PeftModelForCausalLM True"

    ckpt = (out / "checkpoints" / checkpoint_name(6) / "README.md").read_text(encoding="utf-8")
    assert "This is the checkpoint of step 6 of 8, saved while training" in ckpt
    assert "More Information Needed" not in ckpt and "## Sample answers" not in ckpt


def _facts() -> CardFacts:
    return CardFacts(ModelFacts("4-bit NF4, double-quantized", ["q_proj", "v_proj"], 10, 1000), DataStats(),
                     {"steps": 3, "epochs": 1.0, "tokens": 30, "seconds": 1.5}, {"peft": "0.0"})


@pytest.mark.parametrize("path, hub", [("meta-llama/Llama-3.1-8B", True), ("gpt2", True),
                                       ("demo://llama", False), ("./models/mine", False), ("/abs/model", False)])
def test_base_model_goes_to_the_front_matter_only_as_a_hub_id(path: str, hub: bool, tmp_path: Path) -> None:
    cfg = load_config(None, [f"model.path={path}", f"output.dir={tmp_path / 'run'}"])
    assert is_hub_id(path) is hub
    text = render(cfg, _facts())
    meta = _front_matter(text)
    assert meta.get("base_model") == (path if hub else None)
    assert (f"base_model:adapter:{path}" in meta["tags"]) is hub
    assert f"A LoRA adapter for `{path}`" in text  # as the user wrote it
    if path.startswith("demo://"):
        assert f"base_path = resolve_model_path({path!r})" in text
    else:
        assert f"base_path = {path!r}\n" in text


def test_an_existing_local_folder_is_no_hub_id(tmp_path: Path) -> None:
    (tmp_path / "org" / "name").mkdir(parents=True)
    assert is_hub_id("org/name") and not is_hub_id(str(tmp_path / "org" / "name"))


@pytest.mark.parametrize("overrides, want", [
    (["adapter.type=none", "quantization.bits=16"], "fp32"),  # full fine-tuning keeps fp32 master weights
    (["quantization.bits=16", "quantization.compute_dtype=bf16"], "bf16"),
    (["quantization.bits=4"], "4-bit NF4, double-quantized"),
    (["quantization.bits=4", "quantization.quant_type=fp4", "quantization.double_quant=false"], "4-bit FP4"),
    (["quantization.bits=8"], "8-bit (LLM.int8)"),
])
def test_weight_precision_is_read_from_the_weights(tiny_llama: Path, overrides: list[str], want: str) -> None:
    cfg = load_config(None, [f"model.path={tiny_llama}", "adapter.rank=4", *overrides])
    model = load_base(cfg)
    if cfg.adapter.type != "none":
        model = attach_adapters(model, cfg.adapter)
    assert weight_precision(model) == want


def test_a_full_fine_tune_card_says_fp32_and_loads_with_transformers(tmp_path: Path, tiny_llama: Path) -> None:
    path = write_run_yaml(tmp_path, tiny_llama, adapter={"type": "none"}, quantization={"bits": 16})
    train(config(path, "train.max_steps=2"))
    text = (tmp_path / "out" / "README.md").read_text(encoding="utf-8")
    assert _front_matter(text)["library_name"] == "transformers"
    assert "- Full fine-tuning: every weight trained, weights in fp32\n" in text
    assert "16-bit" not in text
    assert f"model = AutoModelForCausalLM.from_pretrained({str(tmp_path / 'out')!r})" in _python_block(text)
