"""Build a training output folder (adapter + tokenizer + resolved config + run record) without training.

This is the folder `loratune train` writes; chat, serve and export consume it. The LoRA B matrices are
set to random non-zero values so that the adapter really changes the model's outputs.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from loratune.config import Config, DataConfig, ModelConfig, QuantizationConfig, dump_yaml
from loratune.data.templates import TEMPLATES
from loratune.model.adapters import attach_adapters
from loratune.model.load import load_base, load_tokenizer
from loratune.model.tiny import FAMILIES


def make_adapter_dir(base: Path, out: Path, *, bits: int = 16, seed: int = 1, scale: float = 0.5,
                     rank: int = 8, family: str = "llama", template: str | None = None) -> Path:
    """Write OUT/ like `loratune train` does, for the tiny `base` model; returns `out`.

    `template` names a registry template trained with instead of the model's own (`data.template=NAME`):
    the folder's tokenizer then carries that template, as `train.run_folder.save_run` writes it.
    """
    cfg = Config(model=ModelConfig(path=str(base)), quantization=QuantizationConfig(bits=bits),
                 data=DataConfig(template=template or "auto"))
    cfg.adapter.rank, cfg.adapter.alpha, cfg.adapter.dropout = rank, 16.0, 0.0
    tok, info = load_tokenizer(cfg.model)
    model = attach_adapters(load_base(cfg), cfg.adapter)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # A as well as B from the seed: peft draws A from the global RNG, which tests share
        for name, p in model.named_parameters():
            if "lora_A" in name:
                p.copy_(torch.randn(p.shape, generator=gen) / p.shape[1] ** 0.5)
            elif "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * scale)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    template = TEMPLATES[template or FAMILIES[family].template]
    tok.chat_template = template.jinja
    tok.save_pretrained(out)
    (out / "loratune.yaml").write_text(dump_yaml(cfg), encoding="utf-8")
    run = {"template": {"name": template.name, "stop": template.stop},
           "versions": {"torch": torch.__version__},
           "tokenizer": dict(info.__dict__)}
    (out / "loratune_run.json").write_text(json.dumps(run, indent=2), encoding="utf-8")
    return out
