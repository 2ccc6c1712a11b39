"""adapter.type freeze: the last N decoder layers and named modules train in full, the rest stays the base's;
the whole model is written and loads as a plain model (transformers, loratune chat); resume continues it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from train_helpers import write_run_yaml
from transformers import AutoModelForCausalLM

from loratune.config import load_config
from loratune.errors import ConfigError
from loratune.model.freeze import freeze_tune, trainable_modules


def test_trainable_modules(tiny_llama: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(tiny_llama)
    assert trainable_modules(model, 1, []) == ["model.layers.1"]
    assert trainable_modules(model, 1, ["norm", "lm_head"]) == ["model.layers.1", "model.norm", "lm_head"]
    assert trainable_modules(model, 0, ["mlp"]) == ["model.layers.0.mlp", "model.layers.1.mlp"]
    with pytest.raises(ConfigError, match="no module named 'mpl'"):
        trainable_modules(model, 0, ["mpl"])
    with pytest.raises(ConfigError, match="has 2 decoder layers"):
        trainable_modules(model, 3, [])
    freeze_tune(model, 1, ["norm"])
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trained and all(n.startswith(("model.layers.1.", "model.norm.")) for n in trained)
    assert any(n.startswith("model.norm.") for n in trained)


@pytest.mark.parametrize("overrides, message", [
    (["adapter.type=freeze"], "needs quantization.bits 16 or 32"),
    (["adapter.type=freeze", "quantization.bits=32", "adapter.freeze_layers=0"], "freeze_layers > 0"),
    (["adapter.type=freeze", "quantization.bits=32", "train.method=dpo"], "reference policy"),
])
def test_config_refuses(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(None, ["model.path=demo://llama", *overrides])


def test_freeze_run_trains_only_those_and_reloads(tmp_path: Path, tiny_llama: Path) -> None:
    from loratune.cli import main
    from loratune.infer.load import load_engine
    from loratune.infer.sampling import SamplingParams

    path = write_run_yaml(tmp_path, tiny_llama, train={"max_steps": 2, "save_every": 1})
    args = ["train", str(path), "adapter.type=freeze", "quantization.bits=32", "adapter.freeze_layers=1",
            "adapter.freeze_modules=[norm]"]
    assert main(args) == 0
    out = tmp_path / "out"
    assert (out / "config.json").is_file() and not (out / "adapter_config.json").exists()
    base = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).state_dict()
    tuned = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).state_dict()
    changed = {k for k in base if not torch.equal(base[k], tuned[k])}
    assert changed and all(k.startswith(("model.layers.1.", "model.norm.")) for k in changed)
    assert "model.norm.weight" in changed and any(k.startswith("model.layers.1.mlp") for k in changed)
    engine = load_engine([str(out)])
    events = list(engine.chat([{"role": "user", "content": "What is NF4?"}], SamplingParams(max_new_tokens=3,
                                                                                            temperature=0.0)))
    assert events
    assert main([*args, "train.max_steps=3", "train.allow_config_change=true"]) == 0  # resumes from step 2
