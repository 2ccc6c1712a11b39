"""End to end with a real tokenizer and its real chat template: train -> data preview -> chat -> peft load.

A tiny random Qwen3 model is built around the real Qwen3 tokenizer (151k-token vocabulary, its own
template with think blocks), trained through `loratune train` on multi-turn conversations (which Qwen3's
template renders differently in history and last turn), previewed, chatted with, and loaded by peft.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from loratune.cli import main
from loratune.model.tiny import build_tiny_arch

ROOT = Path(__file__).parents[2]
CONVERSATIONS = [
    [{"role": "system", "content": "You answer in one word."},
     {"role": "user", "content": "Capital of France?"}, {"role": "assistant", "content": "Paris."},
     {"role": "user", "content": "And of Italy?"},
     {"role": "assistant", "content": "<think>\nItaly's capital is Rome.\n</think>\n\nRome."}],
    [{"role": "user", "content": "Colour of the sky?"}, {"role": "assistant", "content": "Blue."}],
]


@pytest.fixture(scope="module")
def qwen3_model(tokenizer_dir, tmp_path_factory) -> Path:
    return build_tiny_arch("qwen3", tokenizer_dir("qwen3"), tmp_path_factory.mktemp("qwen3"))


@pytest.mark.slow
def test_train_preview_chat_and_peft_load(qwen3_model: Path, tmp_path: Path, capsys) -> None:
    data = tmp_path / "chats.jsonl"
    data.write_text("".join(json.dumps({"messages": c}) + "\n" for c in CONVERSATIONS * 8), encoding="utf-8")
    out = tmp_path / "run"
    args = [str(ROOT / "examples" / "quickstart.yaml"), f"model.path={qwen3_model}", f"data.datasets.0.path={data}",
            f"output.dir={out}", "train.epochs=2", "train.batch_size=4", "adapter.rank=4", "train.log_every=1", "output.sample_prompts=[]"]

    assert main(["data", "preview", *args, "-n", "1", "--color", "never"]) == 0
    shown = capsys.readouterr().out
    # the supervised text of the first sample: each answer and its end of turn, the last with its think block
    assert "⟦Paris.<|im_end|>⟧" in shown
    assert "⟦<think>\nItaly's capital is Rome.\n</think>\n\nRome.<|im_end|>⟧" in shown

    assert main(["train", *args]) == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["loss"] < rows[0]["loss"]
    run = json.loads((out / "loratune_run.json").read_text())
    assert run["template"]["stop"] == "{eos}"  # <|im_end|>, found from the template, is Qwen3's eos

    capsys.readouterr()
    assert main(["chat", str(out), "--prompt", "Colour of the sky?", "--temperature", "0", "--max-tokens", "8"]) == 0
    answer = capsys.readouterr().out
    assert "<|im_end|>" not in answer and "<|im_start|>" not in answer  # stopped at the end of turn, no markup

    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(out)
    assert tok.chat_template == AutoTokenizer.from_pretrained(qwen3_model).chat_template  # the real template kept
    base = AutoModelForCausalLM.from_pretrained(qwen3_model)
    ids = tok.apply_chat_template([{"role": "user", "content": "Colour of the sky?"}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True)["input_ids"]
    with torch.no_grad():
        plain = base(ids).logits
        adapted = PeftModel.from_pretrained(base, out)(ids).logits
    assert (plain - adapted).abs().max() > 1e-3
