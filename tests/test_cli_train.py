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


def test_train_cli_output_is_clean(tmp_path: Path, tiny_llama: Path, capfd, caplog) -> None:
    """What a user reads: no library warnings (deprecations, bitsandbytes' paged-optimizer fallback, PyTorch's
    scheduler order), training facts worded for training, sample answers before and after, the summary."""
    import logging
    import warnings

    out = tmp_path / "run"
    caplog.set_level(logging.INFO)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        code = main(["train", str(ROOT / "examples" / "quickstart.yaml"), f"model.path={tiny_llama}",
                     f"data.datasets.0.path={ROOT / 'examples' / 'data' / 'quickstart.jsonl'}",
                     f"output.dir={out}", "train.epochs=1", "adapter.rank=4", "output.sample_max_new_tokens=4",
                     "train.optimizer=paged_adamw_32bit"])
    assert code == 0
    assert [str(w.message) for w in caught] == []
    text = "".join(capfd.readouterr())
    for noise in ("Warning", "deprecated"):
        assert noise not in text
    assert "padded with eos" in caplog.text and "paging needs a CUDA GPU" in caplog.text
    assert text.index("sample answers before training") < text.index("sample answers, before -> after") \
        < text.index("training done: 10 steps")
    assert f"chat with it:  loratune chat {out}" in text


def test_tokenizer_loading_says_nothing_about_training(tiny_llama: Path, caplog) -> None:
    """chat and serve load tokenizers too: the pad-is-eos note is the trainer's to make, worded for training."""
    import logging

    from loratune.config import ModelConfig
    from loratune.model.load import load_tokenizer

    with caplog.at_level(logging.INFO):
        _, info = load_tokenizer(ModelConfig(path=str(tiny_llama)))
    assert info.pad_is_eos and not [r for r in caplog.records if r.levelno >= logging.INFO]


def test_log_lines_read_as_sentences() -> None:
    import logging

    from loratune.cli import UserFormatter

    def line(level: int) -> str:
        return UserFormatter().format(logging.LogRecord("loratune.train", level, __file__, 1, "step %d done", (3,), None))

    assert line(logging.INFO) == "step 3 done"
    assert line(logging.WARNING) == "warning: step 3 done" and line(logging.ERROR) == "error: step 3 done"


def test_other_libraries_warnings_are_shown_once() -> None:
    import logging

    from loratune.cli import _shown_once

    def record(name: str, level: int) -> logging.LogRecord:
        return logging.LogRecord(name, level, __file__, 1, "msg", None, None)

    own = logging.getLogger("loratune_test_lib_with_handler")
    own.addHandler(logging.NullHandler())
    try:
        assert _shown_once(record("loratune.train", logging.INFO))
        assert not _shown_once(record("some_lib", logging.INFO))  # other libraries' chatter: not ours to print
        assert _shown_once(record("some_lib", logging.WARNING))  # a warning nobody else prints
        assert not _shown_once(record("loratune_test_lib_with_handler.sub", logging.WARNING))  # it prints it itself
    finally:
        own.handlers.clear()
