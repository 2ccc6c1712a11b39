"""loratune's decoder over the base an inference engine loaded: the same tensors, for fast scoring.

`loratune eval` loads each base once, as a transformers (+ peft) model in an `Engine` (generation, the judge's
answers). Multiple-choice scoring is faster on loratune's decoder (padding-free streams, shared prefixes:
`loratune.eval.decoder_loglik`), so where the decoder covers the architecture a `Decoder` is built over the
engine's base tensors (NF4 `Params4bit` included; nothing is copied or loaded twice), and each eval model's
adapter is read into it from its own PEFT folder (`loratune.decoder.peft_io.load_adapter`); the base is
scored with no adapter. Anything the decoder does not take exactly (another architecture, an 8-bit base,
DoRA, extra tensors such as modules_to_save) leaves `decoder_over` returning None with the reason, and
scoring stays on the transformers model.

peft wraps each adapted linear layer around the original one (`<name>.base_layer`); the base's tensors are
found under their checkpoint names once that wrapper level is left out of the name.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

from loratune.decoder.attention import flash_available
from loratune.decoder.config import decoder_config
from loratune.decoder.keys import hf_module_name, linear_names, weight_names
from loratune.decoder.model import Decoder
from loratune.decoder.peft_io import load_adapter
from loratune.errors import LoratuneError
from loratune.model.adapters import is_peft

log = logging.getLogger("loratune.eval")


class NotCovered(LoratuneError):
    """The decoder cannot stand in for this model exactly."""


def _base_tensors(base: nn.Module) -> dict:
    """{checkpoint name: tensor} of the base's own weights (peft's wrapper level and adapters left out)."""
    out = {}
    for name, p in base.named_parameters(remove_duplicate=False):
        if ".lora_" in name or ".lora_magnitude_vector" in name:
            continue
        out[name.replace(".base_layer.", ".")] = p
    return out


def build(model: nn.Module) -> Decoder:
    """A Decoder sharing `model`'s base tensors (raises `NotCovered` with the reason)."""
    base = model.get_base_model() if is_peft(model) else model
    try:
        cfg = decoder_config(base.config)
    except LoratuneError as e:
        raise NotCovered(str(e)) from None
    params = _base_tensors(base)
    names = weight_names(cfg)
    missing = sorted(hf for hf in names.values() if hf not in params)
    used = set(names.values()) | ({"lm_head.weight"} if cfg.tie_embeddings else set())
    extra = sorted(n for n in set(params) - used if not n.startswith(cfg.hf_ignored))
    if missing or extra:
        raise NotCovered(f"the loaded model's tensors differ from the decoder's ({(missing or extra)[0]})")
    weights = {ours: params[hf] for ours, hf in names.items()}
    if any(type(w).__name__ == "Int8Params" for w in weights.values()):
        raise NotCovered("8-bit (LLM.int8) bases are scored by transformers")
    first = base.get_submodule(hf_module_name(linear_names(cfg)[0], cfg.hf_prefix))
    first = getattr(first, "base_layer", first)
    compute = getattr(first, "compute_dtype", None) or weights["embed.weight"].dtype
    device = weights["embed.weight"].device
    # flash-attn where it is installed, else SDPA: scoring's streams vary in length, which compiled FlexAttention
    # (the decoder's `auto` on CUDA without flash-attn) would recompile for
    fast = device.type == "cuda" and compute in (torch.float16, torch.bfloat16) and flash_available()
    return Decoder(cfg, weights, compute_dtype=compute, attention="flash" if fast else "sdpa").eval()


def decoder_over(model: nn.Module) -> Decoder | None:
    """`build`, or None (with one log line saying why) where the decoder does not cover the model."""
    try:
        return build(model)
    except NotCovered as e:
        log.info("multiple choice is scored by transformers, not loratune's decoder: %s", e)
        return None


def use_adapter(decoder: Decoder, folder: str | Path | None) -> None:
    """The PEFT adapter in `folder` on the decoder (replacing any), or none at all (`folder` None: the base)."""
    if folder is not None:
        load_adapter(decoder, folder)
        return
    for layer in decoder.linear_layers().values():
        layer.remove_adapter()
    decoder.track_adapters()
