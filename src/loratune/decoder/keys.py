"""The one map between the decoder's names and the Hugging Face model's names, for weights and adapters.

Our modules are named for what they do (`layers.3.mlp_norm`); the checkpoint's for its history (Llama's
`post_attention_layernorm` is the norm before the MLP, Gemma 2's is the one after attention). This module
is the only place that knows both: `weight_names` for taking a loaded HF model's tensors, and
`hf_module_name` / `our_module_name` for the adapted linear layers, whose HF names are the module names
peft uses in adapter files (`base_model.model.<hf name>.lora_A.weight`). Every family we own keeps its
text decoder under one prefix (`DecoderConfig.hf_prefix`: `model.`, or `model.language_model.` beside a
vision tower) as `embed_tokens`, `layers.N.self_attn`, `layers.N.mlp` and `norm`, and its head as `lm_head`.
"""

from __future__ import annotations

import re

from loratune.decoder.config import DecoderConfig

PEFT_PREFIX = "base_model.model."
_OURS = re.compile(r"^layers\.(\d+)\.(attn|mlp)\.(\w+)$")


def projection_names(cfg: DecoderConfig) -> tuple[list[str], list[str]]:
    """Leaf names of a block's attention and MLP linear layers."""
    attn = ["qkv_proj"] if cfg.fused_qkv else ["q_proj", "k_proj", "v_proj"]
    mlp = ["gate_up_proj"] if cfg.fused_gate_up else ["gate_proj", "up_proj"]
    return attn + ["o_proj"], mlp + ["down_proj"]


def linear_names(cfg: DecoderConfig) -> list[str]:
    """Our names of every linear layer that can carry an adapter (all projections; not the output head)."""
    attn, mlp = projection_names(cfg)
    return [f"layers.{i}.{part}.{leaf}" for i in range(cfg.num_layers)
            for part, leaves in (("attn", attn), ("mlp", mlp)) for leaf in leaves]


def hf_module_name(ours: str, prefix: str = "model.") -> str:
    """`layers.3.attn.q_proj` -> `model.layers.3.self_attn.q_proj` (the name peft gives the module)."""
    m = _OURS.match(ours)
    if m is None:
        raise KeyError(f"{ours!r} is not a decoder projection name")
    layer, part, leaf = m.groups()
    return f"{prefix}layers.{layer}.{'self_attn' if part == 'attn' else 'mlp'}.{leaf}"


def our_module_name(hf: str, prefix: str = "model.") -> str | None:
    """The inverse of `hf_module_name`; None for a name that is not a block projection."""
    m = re.match(r"^" + re.escape(prefix) + r"layers\.(\d+)\.(self_attn|mlp)\.(\w+)$", hf)
    if m is None:
        return None
    layer, part, leaf = m.groups()
    return f"layers.{layer}.{'attn' if part == 'self_attn' else 'mlp'}.{leaf}"


def weight_names(cfg: DecoderConfig) -> dict[str, str]:
    """{our parameter name: HF parameter name} for every tensor the decoder takes from the checkpoint."""
    p = cfg.hf_prefix
    names = {"embed.weight": f"{p}embed_tokens.weight", "norm.weight": f"{p}norm.weight"}
    if not cfg.tie_embeddings:
        names["head.weight"] = "lm_head.weight"
    attn, mlp = projection_names(cfg)
    for i in range(cfg.num_layers):
        ours, hf = f"layers.{i}.", f"{p}layers.{i}."
        names[ours + "attn_norm.weight"] = hf + "input_layernorm.weight"
        if cfg.sandwich_norms:
            names[ours + "post_attn_norm.weight"] = hf + "post_attention_layernorm.weight"
            names[ours + "mlp_norm.weight"] = hf + "pre_feedforward_layernorm.weight"
            names[ours + "post_mlp_norm.weight"] = hf + "post_feedforward_layernorm.weight"
        else:
            names[ours + "mlp_norm.weight"] = hf + "post_attention_layernorm.weight"
        if cfg.qk_norm:
            for norm in ("q_norm", "k_norm"):
                names[f"{ours}attn.{norm}.weight"] = f"{hf}self_attn.{norm}.weight"
        for leaf in attn:
            names[f"{ours}attn.{leaf}.weight"] = f"{hf}self_attn.{leaf}.weight"
            if (cfg.o_bias if leaf == "o_proj" else cfg.qkv_bias):
                names[f"{ours}attn.{leaf}.bias"] = f"{hf}self_attn.{leaf}.bias"
        for leaf in mlp:
            names[f"{ours}mlp.{leaf}.weight"] = f"{hf}mlp.{leaf}.weight"
            if cfg.mlp_bias:
                names[f"{ours}mlp.{leaf}.bias"] = f"{hf}mlp.{leaf}.bias"
    return names
