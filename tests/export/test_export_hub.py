"""`loratune export --push-to-hub`: the adapter alone, and the merged model with its GGUF, pushed through
huggingface_hub to a local fake hub (tests/export/fake_hub.py); the bytes that arrive, the model card, the
endpoint and token, and the one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from fake_hub import FakeHub

from loratune.cli import main
from loratune.export.hub import files_to_push, merged_card
from run_folder import make_adapter_dir

CARD = """---
library_name: peft
pipeline_tag: text-generation
tags:
- loratune
- lora
- qlora
---

# myrun

A LoRA adapter for `demo://llama`, trained with loratune.

## Method

- LoRA: rank 8

## Results

| eval loss | 1.23 |
"""


@pytest.fixture(scope="module")
def adapter(tiny_llama: Path, tmp_path_factory) -> Path:
    run = make_adapter_dir(tiny_llama, tmp_path_factory.mktemp("hub") / "myrun", bits=16, seed=3, scale=0.3)
    (run / "README.md").write_text(CARD, encoding="utf-8")
    (run / "checkpoints" / "step-00000001").mkdir(parents=True)
    (run / "checkpoints" / "step-00000001" / "optimizer.pt").write_bytes(b"not for the hub")
    return run


@pytest.fixture
def hub(monkeypatch):
    """The fake hub, reachable: tests/conftest.py sets HF_HUB_OFFLINE, which huggingface_hub reads once at import
    (its own tests switch it the same way)."""
    import huggingface_hub.constants

    with FakeHub() as h:
        monkeypatch.setenv("HF_TOKEN", "hf_test_token")
        monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
        yield h


def test_adapter_alone_is_pushed_as_it_is(adapter: Path, hub: FakeHub, capsys) -> None:
    assert main(["export", str(adapter), "--push-to-hub", "alice/myrun", "--adapter-only", "--private",
                 "--hub-endpoint", hub.endpoint]) == 0
    repo = hub.repos["alice/myrun"]
    assert repo["private"] is True
    want = {p.as_posix() for p in files_to_push(adapter)}
    assert set(repo["files"]) == want and "adapter_model.safetensors" in want
    assert not any(p.startswith("checkpoints/") for p in repo["files"])
    for name, data in repo["files"].items():
        assert data == (adapter / name).read_bytes()
    assert hub.auth == ["Bearer hf_test_token"] * 2  # huggingface_hub's own token resolution (HF_TOKEN)
    assert "pushed the adapter" in capsys.readouterr().out
    # pushing again is a second commit to the same repository
    assert main(["export", str(adapter), "--push-to-hub", "alice/myrun", "--adapter-only",
                 "--hub-endpoint", hub.endpoint]) == 0
    assert len(repo["commits"]) == 2


def test_endpoint_from_hf_endpoint(adapter: Path, hub: FakeHub, monkeypatch) -> None:
    monkeypatch.setenv("HF_ENDPOINT", hub.endpoint)
    assert main(["export", str(adapter), "--push-to-hub", "bob/r", "--adapter-only"]) == 0
    assert "README.md" in hub.repos["bob/r"]["files"]


def test_merged_card_keeps_the_run_and_adds_the_export() -> None:
    export = {"dtype": "bf16", "merged_vs_adapter": {"positions": 300, "top1": 0.99, "max_diff": 0.05,
                                                     "mean_diff": 0.004}}
    gguf = [{"kind": "q8_0", "gguf": "/x/m-q8_0.gguf", "bytes": 3 * 2**20,
             "agreement": {"positions": 300, "top1": 0.97, "max_diff": 0.2, "mean_diff": 0.01}}]
    card = merged_card(CARD, export, gguf, "outputs/myrun")
    meta = yaml.safe_load(card.split("---\n")[1])
    assert meta["library_name"] == "transformers"
    assert meta["tags"] == ["loratune", "merged", "gguf"]
    assert "# myrun (merged)" in card
    assert "| merged vs adapter on the dequantized base | 99.00% | 0.05 |" in card
    assert "| GGUF q8_0 (llama.cpp) vs merged | 97.00% |" in card
    assert "`m-q8_0.gguf`: q8_0, 3.0 MiB" in card
    assert card.index("## Export") < card.index("## Method") < card.index("## Results")  # the run's sections kept
    assert "| eval loss | 1.23 |" in card


@pytest.mark.slow
def test_merge_gguf_and_push_through_the_cli(adapter: Path, hub: FakeHub, tmp_path: Path, capsys) -> None:
    out = tmp_path / "merged"
    assert main(["export", str(adapter), "--out", str(out), "--dtype", "fp32", "--gguf", "q8_0",
                 "--push-to-hub", "carol/merged", "--hub-endpoint", hub.endpoint]) == 0
    files = hub.repos["carol/merged"]["files"]
    assert {"config.json", "model.safetensors", "merged-q8_0.gguf", "Modelfile", "README.md",
            "tokenizer.json", "loratune_export.json"} <= set(files)
    assert files["merged-q8_0.gguf"] == (out / "merged-q8_0.gguf").read_bytes()
    assert files["merged-q8_0.gguf"][:4] == b"GGUF"
    modelfile = files["Modelfile"].decode()
    assert "FROM ./merged-q8_0.gguf" in modelfile and 'PARAMETER stop "<|eot_id|>"' in modelfile
    card = files["README.md"].decode()
    assert "library_name: transformers" in card and "## Export" in card
    assert json.loads(files["loratune_export.json"])["merged_vs_adapter"]["top1"] >= 0.9
    printed = capsys.readouterr().out
    assert "GGUF (q8_0)" in printed and "pushed" in printed


def test_errors_are_one_line(adapter: Path, hub: FakeHub, tmp_path: Path, capsys) -> None:
    assert main(["export", str(adapter), "--adapter-only"]) == 2
    assert "needs --push-to-hub" in capsys.readouterr().err
    assert main(["export", str(adapter)]) == 2
    assert "--out is required" in capsys.readouterr().err
    assert main(["export", str(adapter), "--push-to-hub", "a/b", "--adapter-only",
                 "--hub-endpoint", "http://127.0.0.1:9"]) == 2
    err = capsys.readouterr().err
    assert "cannot reach http://127.0.0.1:9" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
