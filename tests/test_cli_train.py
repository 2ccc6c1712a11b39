"""End to end: `loratune train` on a tiny offline model writes an adapter that peft loads."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from loratune.cli import main
from loratune.config import load_config

ROOT = Path(__file__).parents[1]


def test_train_cli_writes_a_standard_peft_adapter(tmp_path: Path, tiny_llama: Path) -> None:
    out = tmp_path / "run"
    code = main(["train", str(ROOT / "examples" / "quickstart.yaml"), f"model.path={tiny_llama}",
                 f"data.datasets.0.path={ROOT / 'examples' / 'data' / 'quickstart.jsonl'}",
                 f"output.dir={out}", "train.epochs=3", "adapter.rank=4", "output.sample_prompts=[]"])
    assert code == 0
    names = {p.name for p in out.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "tokenizer_config.json",
            "loratune.yaml", "loratune_run.json"} <= names
    assert not any(n.endswith((".bin", ".pt", ".pkl")) for n in names)  # safetensors only, never pickle

    # the resolved config round-trips through the loader, and records what ran
    cfg = load_config(out / "loratune.yaml")
    assert cfg.adapter.rank == 4 and cfg.model.path == str(tiny_llama)
    run = json.loads((out / "loratune_run.json").read_text())
    assert run["template"]["name"] and run["versions"]["peft"]

    # training lowered the loss
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows and rows[-1]["loss"] < rows[0]["loss"]

    # plain transformers + peft load the adapter, and it changes the model's output
    base = AutoModelForCausalLM.from_pretrained(tiny_llama)
    tok = AutoTokenizer.from_pretrained(out)
    ids = tok("What is NF4?", return_tensors="pt").input_ids
    with torch.no_grad():
        plain = base(ids).logits
        adapted = PeftModel.from_pretrained(base, out)(ids).logits
    assert (plain - adapted).abs().max() > 1e-3
