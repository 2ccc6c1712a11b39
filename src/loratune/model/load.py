"""Load a base model and its tokenizer the way the config asks: 4/8/16/32-bit, with tokenizer hygiene.

The model goes through transformers' auto classes (a local folder or a hub id), so what runs in tests
on tiny offline models is the same path a real checkpoint takes. `demo://FAMILY` names the built-in
offline demo model, built reproducibly and cached on first use (see `loratune.model.tiny`).
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from loratune.config import Config, ModelConfig
from loratune.errors import ModelError
from loratune.model.hqq_base import quantize_hqq
from loratune.model.hub import locate
from loratune.model.new_tokens import add_to_tokenizer
from loratune.model.prequantized import check_prequantized
from loratune.model.quant import bnb_config, keep_standard_4bit_layout, resolve_compute_dtype
from loratune.model.resolve import checkpointing_on

log = logging.getLogger(__name__)

DEMO_SCHEME = "demo://"


@dataclass(frozen=True)
class TokenizerInfo:
    """What the data and inference stages must know about special tokens, recorded once at load.

    `adds_bos`: encoding plain text prepends BOS. `pad_is_eos`: no distinct pad token exists, so pad
    shares eos's id; loratune masks padding by position, so eos is still supervised and the model
    still learns to stop.
    """

    bos_token: str | None
    bos_id: int | None
    eos_token: str
    eos_id: int
    pad_id: int
    pad_is_eos: bool
    adds_bos: bool


def cache_dir() -> Path:
    return Path(os.environ.get("LORATUNE_CACHE", Path.home() / ".cache" / "loratune"))


def resolve_model_path(path: str) -> str:
    """Turn `demo://FAMILY[-SIZE]` into the folder of the cached demo model (building it once)."""
    if not path.startswith(DEMO_SCHEME):
        return path
    from loratune.model.tiny import FAMILIES, SIZES, build_tiny

    name = path[len(DEMO_SCHEME):]
    family, _, size = name.partition("-")
    size = size or "demo"
    if family not in FAMILIES or size not in SIZES:
        raise ModelError(f"unknown demo model {path!r}; known: " +
                         ", ".join(f"{DEMO_SCHEME}{f}[-{'|'.join(SIZES)}]" for f in FAMILIES))
    folder = cache_dir() / "demo" / f"{family}-{size}-seed0"
    if not (folder / "config.json").is_file():
        log.info("building the demo model %s in %s (once)", path, folder)
        tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
        build_tiny(family, tmp, size=size, seed=0)
        tmp.replace(folder) if not folder.exists() else None
    return str(folder)


def load_tokenizer(mcfg: ModelConfig):
    """Load the tokenizer and make its special tokens safe for training; returns (tokenizer, info)."""
    source = resolve_model_path(mcfg.tokenizer or mcfg.path)
    where = locate(source, mcfg.revision)
    try:
        tok = AutoTokenizer.from_pretrained(where.path, revision=mcfg.revision, trust_remote_code=mcfg.trust_remote_code,
                                            local_files_only=where.local_files_only)
    except (OSError, ValueError) as e:
        raise ModelError(f"cannot load the tokenizer from {source!r}: {e}".splitlines()[0]) from None
    add_to_tokenizer(tok, mcfg.add_tokens, mcfg.add_special_tokens)  # model.add_tokens (loratune.model.new_tokens)
    if tok.eos_token_id is None:
        raise ModelError(f"the tokenizer of {source!r} has no eos token; set one in its tokenizer_config.json")
    pad_is_eos = False
    if tok.pad_token_id is None:
        if tok.unk_token_id is not None:
            tok.pad_token = tok.unk_token
        else:
            tok.pad_token = tok.eos_token
            pad_is_eos = True
            # said at debug level: what it means for training is the trainer's to say (train/run.py)
            log.debug("the tokenizer has no pad or unk token: padding uses eos (id %d)", tok.eos_token_id)
    else:
        pad_is_eos = tok.pad_token_id == tok.eos_token_id
    tok.padding_side = "right"
    probe = tok("a").input_ids
    adds_bos = tok.bos_token_id is not None and len(probe) > 0 and probe[0] == tok.bos_token_id
    info = TokenizerInfo(tok.bos_token, tok.bos_token_id, tok.eos_token, tok.eos_token_id,
                         tok.pad_token_id, pad_is_eos, adds_bos)
    return tok, info


def _saved_quantized(source: str) -> bool:
    """A local folder whose config.json already holds a quantization_config (e.g. `export --quantize-4bit`)."""
    config = Path(source) / "config.json"
    try:
        return config.is_file() and "quantization_config" in json.loads(config.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False


def check_hqq_source(source: str) -> None:
    """quantization.method hqq quantizes a full-precision checkpoint; one saved quantized already cannot be."""
    if _saved_quantized(source):
        raise ModelError(f"{source}: config.json holds a quantization_config (the checkpoint is quantized already); "
                         "quantization.method hqq needs a 16/32-bit checkpoint")


def load_base(cfg: Config) -> PreTrainedModel:
    """Load the frozen base in the precision `cfg.quantization` asks for."""
    q = cfg.quantization
    compute = resolve_compute_dtype(q.compute_dtype)
    # Trainable weights stay fp32: full fine-tuning loads fp32 master weights (compute may autocast).
    # Everything frozen that is not quantized (embedding, output head, norms) loads in the compute dtype, not
    # upcast to fp32 wholesale as peft's prepare_model_for_kbit_training does: at a 128k vocabulary the
    # embedding and head alone would cost GBs more. What stability needs is in fp32 anyway: the norms compute
    # their statistics in fp32 inside the model's RMSNorm (their weights stay in the compute dtype, since an
    # fp32 norm weight would promote the whole residual stream to fp32), the trainable adapters and their
    # optimizer state are fp32 (adapters.py), and the loss's log-softmax runs in fp32 (train/loss.py).
    weight_dtype = torch.float32 if (cfg.adapter.type in ("none", "freeze") or q.bits == 32) else compute
    where = locate(resolve_model_path(cfg.model.path), cfg.model.revision)
    source = where.path
    kwargs = dict(
        revision=cfg.model.revision, local_files_only=where.local_files_only,
        trust_remote_code=cfg.model.trust_remote_code,
        attn_implementation=None if cfg.model.attn_implementation == "auto" else cfg.model.attn_implementation,
        dtype=weight_dtype,
    )
    hqq = q.method == "hqq" and q.bits < 16
    if hqq:
        check_hqq_source(source)
    elif check_prequantized(source) is None:  # saved quantized (bitsandbytes, GPTQ, AWQ): loads with its own settings
        kwargs["quantization_config"] = bnb_config(q, compute)
    if cfg.model.rope_scaling is not None:  # the config stretched before the model (and its RoPE) is built
        from loratune.model.rope_scaling import scaled_config

        kwargs["config"] = scaled_config(source, cfg.model, where.local_files_only)
    if torch.cuda.is_available() and not hqq:  # straight to the GPU: no full-size copy in host memory first
        kwargs["device_map"] = {"": torch.cuda.current_device()}
    try:
        model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
    except (OSError, ValueError) as e:
        raise ModelError(f"cannot load the model from {source!r}: {e}".splitlines()[0]) from None
    model.config.use_cache = False
    if hqq:  # loaded in host memory in the compute dtype, each linear layer quantized straight onto the device
        device = f"cuda:{torch.cuda.current_device()}" if torch.cuda.is_available() else "cpu"
        quantize_hqq(model, q.bits, q.group_size, compute, device)
        model.to(device)  # the rest (embedding, norms, head); HQQLinear stays where it was quantized to
    keep_standard_4bit_layout(model)  # before any forward: see loratune.model.quant
    return model


def enable_checkpointing(model: PreTrainedModel, cfg: Config) -> bool:
    """Non-reentrant activation checkpointing where `checkpointing_on` decides it (the run's one rule: on by
    default for quantized bases); returns whether on."""
    on = checkpointing_on(cfg)
    if on:
        # Non-reentrant checkpointing propagates gradients to adapters even though the embedding
        # output does not require grad, so no `enable_input_require_grads` hook is needed.
        kwargs = {"use_reentrant": False}
        if hasattr(model, "activation_checkpointing_enable"):  # the name in newer transformers
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:  # older transformers (the old name, deprecated in newer ones)
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    return on
