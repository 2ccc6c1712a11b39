"""Build the decoder from a checkpoint: loaded through transformers/bitsandbytes, weights taken, HF tree dropped.

Why this route: the checkpoint formats (sharded safetensors, a pre-quantized folder, hub ids, dtype and
4-bit quantization on load) are transformers' and bitsandbytes' business, and `loratune.model.load.load_base`
already loads them the way the config asks. We then take every tensor the decoder needs from the loaded
model by name (`loratune.decoder.keys.weight_names`): the same tensor objects, quantized `Params4bit`
included, no copy. A checkpoint tensor the decoder would not use (a bias it does not expect, an extra
module) is an error, not silently dropped. The caller lets go of the HF model afterwards, which frees its
module tree (the tensors live on in the decoder).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from loratune.config import Config
from loratune.decoder.config import decoder_config
from loratune.decoder.keys import hf_module_name, linear_names, weight_names
from loratune.decoder.model import Decoder
from loratune.errors import ModelError
from loratune.model.resolve import checkpointing_on


def decoder_from_hf(model: nn.Module, *, attention: str = "auto", checkpointing: bool = False,
                    train_base: bool = False) -> Decoder:
    """A Decoder over the tensors of a loaded transformers causal LM (shared with it, not copied).

    `train_base`: the dense base weights stay trainable (full fine-tuning); otherwise every base tensor is
    frozen (`requires_grad=False`), which also holds for the HF model that shares them."""
    if not hasattr(model, "config") or hasattr(model, "peft_config"):
        raise ModelError("decoder_from_hf takes a plain transformers model (load_base), not a peft-wrapped one")
    cfg = decoder_config(model.config)
    params = dict(model.named_parameters(remove_duplicate=False))
    names = weight_names(cfg)
    missing = sorted(hf for hf in names.values() if hf not in params)
    if missing:
        raise ModelError(f"the {cfg.model_type} checkpoint lacks {missing[:3]} ({len(missing)} tensors the decoder "
                         "needs)")
    used = set(names.values()) | ({"lm_head.weight"} if cfg.tie_embeddings else set())
    unused = sorted(n for n in set(params) - used if not n.startswith(cfg.hf_ignored))
    if unused:
        raise ModelError(f"the {cfg.model_type} checkpoint holds tensors loratune's decoder would not use: "
                         f"{unused[:3]}{' ...' if len(unused) > 3 else ''}; it trains through the HF + peft path")
    if cfg.tie_embeddings and "lm_head.weight" in params and params["lm_head.weight"] is not params[names["embed.weight"]]:
        raise ModelError("config.json says tie_word_embeddings but the loaded lm_head is a separate tensor")
    weights = {ours: params[hf] for ours, hf in names.items()}
    for w in weights.values():
        if type(w).__name__ == "Int8Params":
            raise ModelError("8-bit (LLM.int8) bases train through the HF + peft path, not loratune's decoder")
        w.requires_grad_(train_base and getattr(w, "quant_state", None) is None)
    first = model.get_submodule(hf_module_name(linear_names(cfg)[0], cfg.hf_prefix))
    compute = getattr(first, "compute_dtype", None) or weights["embed.weight"].dtype
    return Decoder(cfg, weights, compute_dtype=compute, attention=attention, checkpointing=checkpointing)


def check_supported(cfg: Config) -> None:
    """Refuse, before loading anything, what loratune's decoder does not do (the HF + peft path does)."""
    a = cfg.adapter
    if cfg.quantization.method == "hqq" and cfg.quantization.bits < 16:
        raise ModelError("quantization.method=hqq (an HQQ base) trains through the HF + peft path, not loratune's "
                         "decoder")
    if cfg.quantization.bits == 8:
        raise ModelError("quantization.bits=8 (LLM.int8) trains through the HF + peft path, not loratune's decoder")
    if a.type == "lora" and a.dora:
        raise ModelError("adapter.dora=true trains through the HF + peft path, not loratune's decoder")
    if cfg.model.add_tokens or cfg.model.add_special_tokens:
        raise ModelError("model.add_tokens/add_special_tokens (trained embedding rows) train through the HF + peft "
                         "path, not loratune's decoder")
    if a.type == "lora" and a.modules_to_save:
        raise ModelError("adapter.modules_to_save trains through the HF + peft path, not loratune's decoder")


@dataclass(frozen=True)
class BaseFacts:
    """What the loaded transformers model knew beside its tensors, kept when its module tree goes: the name the
    adapter config records as its base, its generation config (end-of-sequence ids) and its context length."""

    name_or_path: str
    generation_config: Any | None
    context_length: int


def load_decoder(cfg: Config, path: str | None = None, *, attention: str = "auto", seed: int | None = None,
                 checkpointing: bool | None = None) -> tuple[Decoder, BaseFacts]:
    """The decoder `loratune train` would train for `cfg` (base precision, checkpointing, adapters, model.kernels),
    from the checkpoint at `path` (default `cfg.model.path`: a folder, a hub id or `demo://...`), and the base's facts.
    `checkpointing`: activation checkpointing (default: as train.gradient_checkpointing decides)."""
    from transformers import AutoConfig

    from loratune.model.hub import locate
    from loratune.model.load import load_base, resolve_model_path

    if path is not None:
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, path=path))
    check_supported(cfg)
    where = locate(resolve_model_path(cfg.model.path), cfg.model.revision)
    try:  # the model's config first: an unsupported family fails before gigabytes load
        hf_config = AutoConfig.from_pretrained(where.path, revision=cfg.model.revision,
                                               local_files_only=where.local_files_only,
                                               trust_remote_code=cfg.model.trust_remote_code)
    except (OSError, ValueError) as e:
        raise ModelError(f"cannot read the model config from {cfg.model.path!r}: {e}".splitlines()[0]) from None
    decoder_config(hf_config)
    model = load_base(cfg)
    facts = BaseFacts(getattr(model, "name_or_path", None) or cfg.model.path, getattr(model, "generation_config", None),
                      int(getattr(model.config, "max_position_embeddings", 0) or 4096))
    decoder = decoder_from_hf(model, attention=attention,
                              checkpointing=checkpointing_on(cfg) if checkpointing is None else checkpointing,
                              train_base=cfg.adapter.type == "none")
    del model  # the HF module tree goes; its tensors live on in the decoder
    decoder.use_kernels(cfg.model.kernels is not False)  # model.kernels: the Triton kernels on CUDA, or plain PyTorch
    if cfg.adapter.type == "lora":
        a = cfg.adapter
        decoder.add_adapters(a.rank, a.alpha, a.dropout, a.rslora, a.target_modules, tuple(a.exclude_modules),
                             seed=seed)
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return decoder, facts


def build_decoder(cfg: Config, path: str | None = None, *, attention: str = "auto", seed: int | None = None) -> Decoder:
    """`load_decoder` without the base's facts."""
    return load_decoder(cfg, path, attention=attention, seed=seed)[0]
