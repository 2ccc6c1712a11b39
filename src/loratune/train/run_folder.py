"""What a run leaves in its output folder, so chat, serve and export reproduce training exactly.

    OUT/adapter_config.json, adapter_model.safetensors   standard PEFT adapter (safetensors only), written by
                            peft or by loratune's decoder (`loratune.decoder.peft_io`): the same files
    OUT/tokenizer.json, tokenizer_config.json, chat_template.jinja   the tokenizer, with the template used
    OUT/loratune.yaml       the resolved config (every key, defaults included)
    OUT/loratune_run.json   template name and stop text, tokenizer facts, library versions, run summary
    OUT/README.md           the model card (card.py), in place of the template peft writes

The same files make up the usable part of every checkpoint folder (checkpoint.py), so `loratune chat`
works on a checkpoint as on a finished run. `loratune_run.json` is written last, atomically: a folder
without it is not a finished run.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
from importlib import metadata
from pathlib import Path

from loratune.config import Config, dump_yaml
from loratune.data.templates import ChatTemplate
from loratune.errors import LoratuneError
from loratune.model.adapters import adapters_finite
from loratune.model.build import TrainModel
from loratune.model.load import TokenizerInfo

CONFIG_FILE = "loratune.yaml"
RUN_FILE = "loratune_run.json"
CARD_FILE = "README.md"
VERSIONED = ("loratune", "torch", "transformers", "peft", "bitsandbytes", "accelerate", "safetensors", "tokenizers")


class NonFiniteWeights(LoratuneError):
    """Weights with NaN or inf were about to be saved."""


def write_json_atomic(path: Path, data: dict) -> None:
    """Write a JSON file so that readers see the old content or the new, never a torn one."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with tmp.open("w", encoding="utf-8") as f:
        json.dump(data, f, indent=2)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def library_versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in VERSIONED:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def save_run(out: Path, model: TrainModel, tokenizer, template: ChatTemplate, info: TokenizerInfo,
             cfg: Config, extra: dict | None = None, card: str | None = None) -> None:
    """Write the adapter (or full model), tokenizer with template, model card, resolved config and run facts."""
    if not adapters_finite(model.module):
        raise NonFiniteWeights("refusing to save: the trained weights contain NaN or inf")
    out.mkdir(parents=True, exist_ok=True)
    model.save(out)
    if card is not None:  # after peft's save, which writes its template card as README.md
        (out / CARD_FILE).write_text(card, encoding="utf-8")
    tokenizer.chat_template = template.jinja
    tokenizer.save_pretrained(out)
    (out / CONFIG_FILE).write_text(dump_yaml(cfg), encoding="utf-8")
    run = {"template": {"name": template.name, "stop": template.stop},
           "tokenizer": dataclasses.asdict(info), "versions": library_versions(), **(extra or {})}
    write_json_atomic(out / RUN_FILE, run)  # last: its presence marks the folder complete
