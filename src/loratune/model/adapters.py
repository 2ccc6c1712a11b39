"""The one place that decides which modules get adapters, and attaches them through peft.

Targets are found from the model, not from a list of names: every linear layer (plain, bitsandbytes
4-bit or 8-bit) except the output head, which the model itself names through `get_output_embeddings()`.
"""

from __future__ import annotations

import contextlib
import warnings
from collections import Counter
from collections.abc import Iterator

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn
from transformers import PreTrainedModel

from loratune.config import AdapterConfig
from loratune.errors import ConfigError, ModelError
from loratune.model.freeze import freeze_tune
from loratune.model.hqq_base import hqq_linear_type, hqq_weights
from loratune.model.lora_init import peft_init_value
from loratune.model.quant import keep_standard_4bit_layout, repacked_4bit_layers


def _linear_types() -> tuple[type, ...]:
    import bitsandbytes as bnb

    hqq = hqq_linear_type()  # an HQQ base's layers (loratune.model.hqq_base), when hqq is installed
    return (nn.Linear, bnb.nn.Linear4bit, bnb.nn.Linear8bitLt) + ((hqq,) if hqq is not None else ())


def linear_module_names(model: nn.Module) -> list[str]:
    """Full names of every linear layer except the output head."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return [name for name, mod in model.named_modules()
            if isinstance(mod, _linear_types()) and mod is not head]


def _suffix_match(name: str, suffixes: list[str]) -> bool:
    return any(name == s or name.endswith("." + s) for s in suffixes)


def select_targets(model: nn.Module, cfg: AdapterConfig) -> list[str]:
    """The full names of the modules that will carry adapters, after target and exclude lists."""
    linears = linear_module_names(model)
    if cfg.target_modules == "all-linear":
        chosen = linears
    else:
        chosen = [n for n in linears if _suffix_match(n, cfg.target_modules)]
        missing = [s for s in cfg.target_modules if not any(_suffix_match(n, [s]) for n in linears)]
        if missing:
            leafs = sorted({n.rsplit(".", 1)[-1] for n in linears})
            raise ConfigError(f"adapter.target_modules: no linear layer named {missing} in this model; "
                              f"its linear layers are: {', '.join(leafs)}")
    chosen = [n for n in chosen if not _suffix_match(n, cfg.exclude_modules)]
    if not chosen:
        raise ConfigError("adapter.target_modules/exclude_modules leave no module to adapt")
    return chosen


def _compact(model: nn.Module, targets: list[str]) -> list[str]:
    """Leaf names when they pick exactly `targets` (readable adapter_config.json), else full names."""
    leafs = sorted({t.rsplit(".", 1)[-1] for t in targets})
    picked = [n for n, _ in model.named_modules() if n and _suffix_match(n, leafs)]
    return leafs if sorted(picked) == sorted(targets) else targets


def lora_config(model: nn.Module, cfg: AdapterConfig) -> LoraConfig:
    return LoraConfig(
        r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
        target_modules=_compact(model, select_targets(model, cfg)),
        use_rslora=cfg.rslora, use_dora=cfg.dora, modules_to_save=cfg.modules_to_save or None,
        init_lora_weights=peft_init_value(cfg.init),
        bias="none", task_type="CAUSAL_LM",
    )


def attach_adapters(model: PreTrainedModel, cfg: AdapterConfig) -> nn.Module:
    """Freeze the base and add LoRA adapters (fp32 weights), or unfreeze everything for full fine-tuning."""
    if cfg.type == "none":
        for p in model.parameters():
            p.requires_grad_(True)
        return model
    if cfg.type == "freeze":  # the last layers and named modules trained in full (loratune.model.freeze)
        freeze_tune(model, cfg.freeze_layers, cfg.freeze_modules)
        return model
    _refuse_repacked_base(model)
    keep_standard_4bit_layout(model)
    for p in model.parameters():
        p.requires_grad_(False)
    # autocast_adapter_dtype keeps the adapter weights in fp32 on a 16-bit or 4-bit base: the updates
    # are small relative to the weights and would be rounded away in bf16.
    with _peft_reading_deprecated_alias():
        return get_peft_model(model, lora_config(model, cfg), autocast_adapter_dtype=True)


def _refuse_repacked_base(model: nn.Module) -> None:
    """A base whose 4-bit weights bitsandbytes repacked for CPU inference passes no gradient (quant.py says
    why) and cannot be unpacked exactly: training it would silently leave most adapters at zero gradient."""
    repacked = repacked_4bit_layers(model)
    if repacked:
        raise ModelError(f"{len(repacked)} 4-bit layers (first: {repacked[0]}) were repacked by bitsandbytes for "
                         "CPU inference (an eval-mode forward without gradients), and no gradient can pass through "
                         "them; load the base with loratune.model.load.load_base, which keeps the trainable layout")


@contextlib.contextmanager
def _peft_reading_deprecated_alias() -> Iterator[None]:
    """peft (0.21) reads `model.is_gradient_checkpointing` when it wraps a model; newer transformers renamed it
    `is_activation_checkpointing` and warn on each read of the old name. The notice is about peft's code, not
    about the user's run, so exactly that message is ignored, for this one call; every other warning shows."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        yield


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; 4-bit weights count as the number of values they hold."""
    trainable = total = 0
    hqq = hqq_weights(model)
    for p in model.parameters():
        n = p.numel()
        if getattr(p, "quant_state", None) is not None:  # packed two 4-bit values per byte
            n = p.quant_state.shape.numel()
        elif id(p) in hqq:  # an HQQ layer's packed weights
            n = hqq[id(p)][0]
        total += n
        trainable += n if p.requires_grad else 0
    return trainable, total


def expected_lora_parameters(model: nn.Module, targets: list[str], rank: int) -> int:
    """r * (d_in + d_out) summed over target modules: the trainable count LoRA must have."""
    mods = dict(model.named_modules())
    total = 0
    for name in targets:
        m = mods[name]
        total += rank * (m.in_features + m.out_features)
    return total


def is_peft(model: nn.Module) -> bool:
    return isinstance(model, PeftModel)


def adapters_finite(model: nn.Module) -> bool:
    return all(torch.isfinite(p).all() for p in model.parameters() if p.requires_grad)


DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.float64: "fp64"}


def weight_precision(model: nn.Module) -> str:
    """How the base weights are stored, read from the weights: the storage holding most of their values.

    The frozen weights of an adapter run; every weight of a full fine-tune (all trainable). 4-bit values
    are counted as the values they hold (two per byte), with their quantization type.
    """
    params = [p for p in model.parameters() if not p.requires_grad] or list(model.parameters())
    counts: Counter[str] = Counter()
    hqq = hqq_weights(model)
    for p in params:
        state = getattr(p, "quant_state", None)
        if id(p) in hqq:
            counts[hqq[id(p)][1]] += hqq[id(p)][0]
        elif state is not None:
            nested = ", double-quantized" if getattr(state, "nested", False) else ""
            counts[f"4-bit {str(state.quant_type).upper()}{nested}"] += state.shape.numel()
        elif p.dtype == torch.int8:
            counts["8-bit (LLM.int8)"] += p.numel()
        else:
            counts[DTYPE_NAMES.get(p.dtype, str(p.dtype).removeprefix("torch."))] += p.numel()
    return counts.most_common(1)[0][0] if counts else "unknown"
