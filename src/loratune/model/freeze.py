"""Freeze-tuning (`adapter.type freeze`): the last N decoder layers, and any named modules, trained in full;
everything else frozen. No adapter: what trains is the model's own weights, so the run writes the whole model
(as full fine-tuning does), which chat, serve and export load like any model folder.

Which layers: the model's decoder layers are the `nn.ModuleList` that holds `config.num_hidden_layers`
modules (found from the model, not from a list of architecture names); `adapter.freeze_layers` of them, the
last ones, train. `adapter.freeze_modules` names more modules trained in full, matched as `target_modules`
are: a suffix of the module's name (`embed_tokens`, `norm`, `lm_head`, `mlp`, `layers.0.self_attn`).
"""

from __future__ import annotations

import logging

from torch import nn

from loratune.errors import ConfigError, ModelError

log = logging.getLogger(__name__)


def decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """(name, list) of the model's decoder layers: the ModuleList as long as config.num_hidden_layers."""
    config = getattr(model, "config", None)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    n = getattr(text, "num_hidden_layers", None)
    found = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m) == n]
    if not found:
        raise ModelError(f"freeze-tuning: no list of {n} decoder layers in this model")
    return found[0]


def _suffix(name: str, suffixes: list[str]) -> bool:
    return any(name == s or name.endswith("." + s) for s in suffixes)


def trainable_modules(model: nn.Module, layers: int, modules: list[str]) -> list[str]:
    """The full names of the modules freeze-tuning trains: the last `layers` decoder layers and `modules`."""
    name, stack = decoder_layers(model)
    if layers > len(stack):
        raise ConfigError(f"adapter.freeze_layers is {layers}, but the model has {len(stack)} decoder layers")
    chosen = [f"{name}.{i}" for i in range(len(stack) - layers, len(stack))]
    names = [n for n, _ in model.named_modules() if n]
    for suffix in modules:
        hits = [n for n in names if _suffix(n, [suffix])]
        if not hits:
            leaves = sorted({n.rsplit(".", 1)[-1] for n in names if not n.rsplit(".", 1)[-1].isdigit()})
            raise ConfigError(f"adapter.freeze_modules: no module named {suffix!r} in this model; its modules are "
                              f"named: {', '.join(leaves)}")
        chosen += hits
    return chosen


def freeze_tune(model: nn.Module, layers: int, modules: list[str]) -> list[str]:
    """Freeze every weight of `model` but those of the modules `trainable_modules` picks; returns their names."""
    chosen = trainable_modules(model, layers, modules)
    for p in model.parameters():
        p.requires_grad_(False)
    for name in chosen:
        for p in model.get_submodule(name).parameters():
            p.requires_grad_(True)
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if not trained:
        raise ConfigError("adapter.type freeze trains nothing: set adapter.freeze_layers > 0 or adapter.freeze_modules")
    log.info("freeze-tuning: %d modules trained in full (%s)", len(chosen),
             ", ".join(chosen[:4]) + (" ..." if len(chosen) > 4 else ""))
    return chosen
