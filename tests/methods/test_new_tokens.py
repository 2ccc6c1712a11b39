"""model.add_tokens / add_special_tokens: the tokenizer grows, the embedding and head are resized and trained,
the adapter holds the new rows and the run holds the tokenizer; `PeftModel.from_pretrained` on a resized base
and `loratune chat`'s loader reproduce the trained model (the added-tokens-lost-at-save failure)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from train_helpers import write_run_yaml
from transformers import AutoModelForCausalLM, AutoTokenizer

from loratune.config import load_config
from loratune.errors import ModelError
from loratune.model.new_tokens import add_to_tokenizer, trained_modules

NEW = ["loratunium"]
SPECIAL = ["<|tool|>"]


def _data(tmp_path: Path) -> Path:
    rows = [{"messages": [{"role": "user", "content": f"Question {i}: what is the element?"},
                          {"role": "assistant", "content": f"<|tool|> It is loratunium, number {i}."}]}
            for i in range(12)]
    path = tmp_path / "data.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_tokenizer_gets_the_tokens_once(tiny_llama: Path) -> None:
    tok = AutoTokenizer.from_pretrained(tiny_llama)
    n = len(tok)
    assert add_to_tokenizer(tok, NEW, SPECIAL) == 2
    assert add_to_tokenizer(tok, NEW, SPECIAL) == 0
    assert len(tok) == n + 2
    ids = tok("<|tool|> loratunium", add_special_tokens=False).input_ids
    assert tok.convert_tokens_to_ids("<|tool|>") in ids and tok.convert_tokens_to_ids("loratunium") in ids
    assert tok.convert_tokens_to_ids(SPECIAL[0]) == n + 1 and "<|tool|>" not in tok.decode(ids, skip_special_tokens=True)


def test_trained_modules_are_the_models_own_names(tiny_models: dict[str, Path]) -> None:
    llama = AutoModelForCausalLM.from_pretrained(tiny_models["llama"])
    assert trained_modules(llama) == ["embed_tokens", "lm_head"]


@pytest.fixture(scope="module")
def run_with_tokens(tmp_path_factory: pytest.TempPathFactory, tiny_llama: Path) -> Path:
    from loratune.cli import main

    tmp = tmp_path_factory.mktemp("tokens")
    path = write_run_yaml(tmp, tiny_llama, model={"path": str(tiny_llama), "add_tokens": NEW,
                                                  "add_special_tokens": SPECIAL},
                          data={"datasets": [{"path": str(_data(tmp))}], "max_length": 64, "eval_split": 0},
                          adapter={"rank": 4, "alpha": 8, "dropout": 0.0},
                          train={"max_steps": 4, "save_every": 2, "lr": 1e-2})
    assert main(["train", str(path)]) == 0
    return tmp / "out"


def test_the_run_saves_tokenizer_and_rows(run_with_tokens: Path, tiny_llama: Path) -> None:
    out = run_with_tokens
    base_tok = AutoTokenizer.from_pretrained(tiny_llama)
    tok = AutoTokenizer.from_pretrained(out)
    assert len(tok) == len(base_tok) + 2
    weights = load_file(out / "adapter_model.safetensors")
    emb = [k for k in weights if "embed_tokens" in k]
    head = [k for k in weights if "lm_head" in k]
    assert emb and head
    assert weights[emb[0]].shape[0] == weights[head[0]].shape[0] == len(tok)
    config = json.loads((out / "adapter_config.json").read_text())
    assert sorted(config["modules_to_save"]) == ["embed_tokens", "lm_head"]
    # trained: the new rows moved away from their initial value (the mean of the old rows)
    base = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
    mean = base.get_input_embeddings().weight.mean(0)
    new_ids = tok.convert_tokens_to_ids(NEW + SPECIAL)
    assert (weights[emb[0]][new_ids] - mean).abs().max() > 1e-3


def test_peft_and_chat_load_the_trained_model(run_with_tokens: Path, tiny_llama: Path) -> None:
    from peft import PeftModel

    from loratune.infer.load import load_engine
    from loratune.infer.sampling import SamplingParams

    out = run_with_tokens
    tok = AutoTokenizer.from_pretrained(out)
    base = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
    with pytest.raises(RuntimeError, match="size mismatch"):  # what happens without the resize
        PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32), out)
    base.resize_token_embeddings(len(tok))
    model = PeftModel.from_pretrained(base, out).eval()
    ids = tok("<|tool|> It is loratunium", return_tensors="pt").input_ids
    with torch.no_grad():
        want = model(input_ids=ids).logits
    weights = load_file(out / "adapter_model.safetensors")
    emb = next(v for k, v in weights.items() if "embed_tokens" in k)
    torch.testing.assert_close(model.get_input_embeddings()(ids)[0], emb[ids[0]])
    engine = load_engine([str(out)], bits=32)
    assert engine.vocab_size == len(tok)
    peft_model = engine.model
    peft_model.set_adapter(engine.adapters[engine.default])
    with torch.no_grad():
        got = peft_model(input_ids=ids).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    events = list(engine.chat([{"role": "user", "content": "Question 3: what is the element?"}],
                              SamplingParams(max_new_tokens=4, temperature=0.0)))
    assert events


def test_decoder_refuses_new_tokens(tiny_llama: Path) -> None:
    from loratune.decoder.load import check_supported

    with pytest.raises(ModelError, match="add_tokens"):
        check_supported(load_config(None, [f"model.path={tiny_llama}", "model.add_tokens=[x]"]))


def test_export_merges_the_new_rows(run_with_tokens: Path, tmp_path: Path) -> None:
    from loratune.export.merge import export

    export(run_with_tokens, tmp_path / "merged", dtype="fp32")
    tok = AutoTokenizer.from_pretrained(tmp_path / "merged")
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32)
    assert merged.get_input_embeddings().weight.shape[0] == len(tok) == len(AutoTokenizer.from_pretrained(run_with_tokens))
    weights = load_file(run_with_tokens / "adapter_model.safetensors")
    emb = next(v for k, v in weights.items() if "embed_tokens" in k)
    new_ids = tok.convert_tokens_to_ids(NEW + SPECIAL)
    torch.testing.assert_close(merged.get_input_embeddings().weight[new_ids], emb[new_ids])
