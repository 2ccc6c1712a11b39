"""What a run leaves in its output folder, so chat, serve and export reproduce training exactly.

    OUT/adapter_config.json, adapter_model.safetensors   standard PEFT adapter (safetensors only)
    OUT/tokenizer.json, tokenizer_config.json, chat_template.jinja   the tokenizer, with the template used
    OUT/loratune.yaml       the resolved config (every key, defaults included)
    OUT/loratune_run.json   template name and stop text, tokenizer facts, library versions
"""

from __future__ import annotations

import dataclasses
import json
import platform
from importlib import metadata
from pathlib import Path

from torch import nn

from loratune.config import Config, OutputConfig, dump_yaml
from loratune.data.templates import ChatTemplate
from loratune.errors import ConfigError
from loratune.model.adapters import adapters_finite
from loratune.model.load import TokenizerInfo

CONFIG_FILE = "loratune.yaml"
RUN_FILE = "loratune_run.json"
VERSIONED = ("loratune", "torch", "transformers", "peft", "bitsandbytes", "accelerate", "safetensors", "tokenizers")


def library_versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in VERSIONED:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def prepare_output_dir(ocfg: OutputConfig) -> Path:
    """Create the output folder; refuse to mix a new run into a finished one unless allowed."""
    out = Path(ocfg.dir)
    if out.exists() and (out / RUN_FILE).exists() and not ocfg.overwrite:
        raise ConfigError(f"output.dir {str(out)!r} already holds a finished run; choose another folder "
                          "or set output.overwrite=true")
    out.mkdir(parents=True, exist_ok=True)
    return out


def save_run(out: Path, model: nn.Module, tokenizer, template: ChatTemplate, info: TokenizerInfo,
             cfg: Config, extra: dict | None = None) -> None:
    """Write the adapter (or full model), tokenizer with template, resolved config and run facts."""
    if not adapters_finite(model):
        raise RuntimeError("refusing to save: the trained weights contain NaN or inf")
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.chat_template = template.jinja
    tokenizer.save_pretrained(out)
    (out / CONFIG_FILE).write_text(dump_yaml(cfg), encoding="utf-8")
    run = {"template": {"name": template.name, "stop": template.stop},
           "tokenizer": dataclasses.asdict(info), "versions": library_versions(), **(extra or {})}
    (out / RUN_FILE).write_text(json.dumps(run, indent=2), encoding="utf-8")
