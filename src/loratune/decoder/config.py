"""The typed description of a decoder we own, read from a Hugging Face config, one reader per model_type.

Why: the decoder's modules (`loratune.decoder.model`) branch only on the fields of `DecoderConfig`
(norm form, gated activation, biases, q/k norms, fused projections, soft-caps, per-layer attention window
and RoPE), never on a model's name. The per-family knowledge lives here and only here: which HF config
field holds each fact for one `model_type` (Gemma 2 calls its activation `hidden_activation`, Qwen2 keeps
biases on q/k/v only, Gemma 3 has one RoPE per layer type, ...). A config asking for something the decoder
does not compute (an unknown model_type, a RoPE variant, bidirectional attention) is a `ModelError` that
says what and where; such models keep running on the HF + peft path.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Literal

from loratune.errors import ModelError

Activation = Literal["silu", "gelu_tanh", "gelu"]
RopeKind = Literal["default", "linear", "dynamic", "llama3", "yarn", "longrope"]

# HF activation names -> the gated product the MLP computes (silu: SwiGLU, gelu*: GeGLU)
ACTIVATIONS: dict[str, Activation] = {"silu": "silu", "swish": "silu", "gelu_pytorch_tanh": "gelu_tanh",
                                      "gelu": "gelu"}


@dataclass(frozen=True)
class RopeConfig:
    """Rotary embedding of one layer: the inverse frequencies are a function of these fields alone
    (`loratune.decoder.rope.inverse_frequencies`); cos/sin are scaled by `attention_factor`."""

    kind: RopeKind
    theta: float
    rotary_dim: int  # rotated leading dims of each head (head_dim * partial_rotary_factor)
    factor: float = 1.0
    original_max_position: int | None = None  # llama3, yarn, longrope; dynamic: max_position_embeddings
    low_freq_factor: float | None = None  # llama3
    high_freq_factor: float | None = None  # llama3
    beta_fast: float = 32.0  # yarn
    beta_slow: float = 1.0  # yarn
    truncate: bool = True  # yarn
    attention_factor: float = 1.0  # yarn, longrope (resolved)
    short_factor: tuple[float, ...] | None = None  # longrope
    long_factor: tuple[float, ...] | None = None  # longrope


@dataclass(frozen=True)
class DecoderConfig:
    """Everything the decoder computes, per layer where it varies. Built by `decoder_config(hf_config)`."""

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    activation: Activation
    rope: tuple[RopeConfig, ...]  # one per layer
    windows: tuple[int | None, ...]  # sliding-window size per layer (keys with q - k < window), None: full
    attn_scale: float
    tie_embeddings: bool
    norm_unit_offset: bool = False  # Gemma: x_hat * (1 + w), computed in fp32
    embed_scale: float | None = None  # Gemma: embeddings * sqrt(hidden), rounded to the weight dtype
    sandwich_norms: bool = False  # Gemma 2/3: norms after attention and after the MLP as well
    qk_norm: bool = False  # Qwen3, Gemma 3: RMSNorm over head_dim on q and k before RoPE
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    fused_qkv: bool = False  # Phi-3: one qkv_proj
    fused_gate_up: bool = False  # Phi-3: one gate_up_proj
    attn_softcap: float | None = None
    final_softcap: float | None = None
    attention_dropout: float = 0.0
    residual_dropout: float = 0.0  # Phi-3's resid_pdrop
    hf_prefix: str = "model."  # where the HF model keeps the text decoder (`model.language_model.`: Gemma 3 4B+)
    hf_ignored: tuple[str, ...] = ()  # HF modules outside the text decoder (a vision tower), left unused

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim


def decoder_config(hf: Any) -> DecoderConfig:
    """The DecoderConfig of a transformers config object (`model.config` or `AutoConfig.from_pretrained`)."""
    model_type = getattr(hf, "model_type", None)
    reader = READERS.get(model_type)
    if reader is None:
        raise ModelError(f"loratune's own decoder does not cover model_type {model_type!r} (it covers "
                         f"{', '.join(READERS)}); such models train through the HF + peft path")
    return reader(hf)


# ---------------------------------------------------------------------------------------- shared readers


def _get(hf: Any, key: str, default: Any = None) -> Any:
    value = getattr(hf, key, default)
    return default if value is None else value


def _require(hf: Any, key: str) -> Any:
    value = getattr(hf, key, None)
    if value is None:
        raise ModelError(f"config.json of this {hf.model_type} model has no {key!r}, which the decoder needs")
    return value


def _activation(hf: Any, key: str) -> Activation:
    name = _require(hf, key)
    if name not in ACTIVATIONS:
        raise ModelError(f"config.json {key}={name!r}: loratune's decoder computes {', '.join(ACTIVATIONS)}")
    return ACTIVATIONS[name]


def _no_bidirectional(hf: Any) -> None:
    if getattr(hf, "use_bidirectional_attention", False):
        raise ModelError("config.json use_bidirectional_attention=true: loratune's decoder is causal only")


def _head_dim(hf: Any) -> int:
    return int(_get(hf, "head_dim") or hf.hidden_size // hf.num_attention_heads)


def _windows_all(hf: Any) -> tuple[int | None, ...]:
    """The same sliding window (or none) on every layer (Mistral, Phi-3)."""
    return (_get(hf, "sliding_window"),) * hf.num_hidden_layers


def _windows_by_type(hf: Any) -> tuple[int | None, ...]:
    """`layer_types[i] == "sliding_attention"` layers use `sliding_window`; the rest attend to everything."""
    types = _get(hf, "layer_types") or ["full_attention"] * hf.num_hidden_layers
    unknown = sorted(set(types) - {"full_attention", "sliding_attention"})
    if unknown:
        raise ModelError(f"config.json layer_types holds {unknown}: loratune's decoder knows full_attention and "
                         "sliding_attention")
    window = _get(hf, "sliding_window")
    return tuple(window if t == "sliding_attention" else None for t in types)


def _rope(hf: Any, params: dict | None, head_dim: int, where: str = "rope_parameters") -> RopeConfig:
    """A RopeConfig from one (flat) rope_parameters dict, as transformers 5 standardises it."""
    p = dict(params or {})
    kind = p.get("rope_type", p.get("type", "default"))
    theta = float(p.get("rope_theta", _get(hf, "rope_theta", 10000.0)))
    partial = float(p.get("partial_rotary_factor", _get(hf, "partial_rotary_factor", 1.0)))
    rotary_dim = int(head_dim * partial)
    if rotary_dim % 2:
        raise ModelError(f"config.json {where}: the rotated dimension {rotary_dim} (head_dim {head_dim} x "
                         f"partial_rotary_factor {partial}) must be even")
    base = {"theta": theta, "rotary_dim": rotary_dim}
    max_pos = _get(hf, "max_position_embeddings")
    # transformers gives a config-level original_max_position_embeddings priority (Phi-3 keeps it there)
    original = _get(hf, "original_max_position_embeddings") or p.get("original_max_position_embeddings") or max_pos
    if kind == "default":
        return RopeConfig("default", **base)
    if kind == "linear":
        return RopeConfig("linear", factor=float(p["factor"]), **base)
    if kind == "dynamic":  # transformers scales from max_position_embeddings (it stays the pretraining length)
        return RopeConfig("dynamic", factor=float(p["factor"]), original_max_position=int(max_pos), **base)
    if kind == "llama3":
        return RopeConfig("llama3", factor=float(p["factor"]), low_freq_factor=float(p["low_freq_factor"]),
                          high_freq_factor=float(p["high_freq_factor"]), original_max_position=int(original), **base)
    if kind == "yarn":
        factor = p.get("factor") or max_pos / original
        attention = p.get("attention_factor")
        if attention is None:
            mscale, mscale_all = p.get("mscale"), p.get("mscale_all_dim")
            attention = (_yarn_mscale(factor, mscale) / _yarn_mscale(factor, mscale_all) if mscale and mscale_all
                         else _yarn_mscale(factor))
        return RopeConfig("yarn", factor=float(factor), original_max_position=int(original),
                          beta_fast=float(p.get("beta_fast") or 32), beta_slow=float(p.get("beta_slow") or 1),
                          truncate=bool(p.get("truncate", True)), attention_factor=float(attention), **base)
    if kind == "longrope":
        factor = p.get("factor") or max_pos / original
        attention = p.get("attention_factor")
        if attention is None:
            attention = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))
        short, long = tuple(map(float, p["short_factor"])), tuple(map(float, p["long_factor"]))
        if len(short) != rotary_dim // 2 or len(long) != rotary_dim // 2:
            raise ModelError(f"config.json {where}: longrope short_factor/long_factor need {rotary_dim // 2} values "
                             f"each, got {len(short)} and {len(long)}")
        return RopeConfig("longrope", factor=float(factor), original_max_position=int(original),
                          attention_factor=float(attention), short_factor=short, long_factor=long, **base)
    raise ModelError(f"config.json {where}: rope_type {kind!r} is not computed by loratune's decoder (it computes "
                     "default, linear, dynamic, llama3, yarn and longrope); such models train through the HF + peft "
                     "path")


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def _rope_params(hf: Any) -> dict | None:
    """The flat rope dict (transformers 5: `rope_parameters`; older configs: `rope_scaling` + `rope_theta`)."""
    params = getattr(hf, "rope_parameters", None)
    if params is None:
        params = dict(getattr(hf, "rope_scaling", None) or {})
        params.setdefault("rope_theta", _get(hf, "rope_theta", 10000.0))
    return params


def _common(hf: Any, **overrides: Any) -> dict[str, Any]:
    """Fields every family reads the same way."""
    head_dim = overrides.pop("head_dim", None) or _head_dim(hf)
    heads = int(_require(hf, "num_attention_heads"))
    fields = {
        "model_type": hf.model_type, "vocab_size": int(_require(hf, "vocab_size")),
        "hidden_size": int(_require(hf, "hidden_size")), "intermediate_size": int(_require(hf, "intermediate_size")),
        "num_layers": int(_require(hf, "num_hidden_layers")), "num_heads": heads,
        "num_kv_heads": int(_get(hf, "num_key_value_heads", heads)), "head_dim": head_dim,
        "rms_norm_eps": float(_get(hf, "rms_norm_eps", 1e-6)), "attn_scale": head_dim ** -0.5,
        "tie_embeddings": bool(_get(hf, "tie_word_embeddings", False)),
        "attention_dropout": float(_get(hf, "attention_dropout", 0.0)),
    }
    if "rope" not in overrides:
        fields["rope"] = (_rope(hf, _rope_params(hf), head_dim),) * fields["num_layers"]
    fields.update(overrides)
    if fields["num_heads"] % fields["num_kv_heads"]:
        raise ModelError(f"config.json: num_attention_heads {heads} is not a multiple of num_key_value_heads "
                         f"{fields['num_kv_heads']}")
    return fields


# ---------------------------------------------------------------------------------------- one per family


def _llama(hf: Any) -> DecoderConfig:
    bias = bool(_get(hf, "attention_bias", False))
    return DecoderConfig(**_common(hf, activation=_activation(hf, "hidden_act"), qkv_bias=bias, o_bias=bias,
                                   mlp_bias=bool(_get(hf, "mlp_bias", False)),
                                   windows=(None,) * hf.num_hidden_layers))


def _mistral(hf: Any) -> DecoderConfig:
    return DecoderConfig(**_common(hf, activation=_activation(hf, "hidden_act"), windows=_windows_all(hf)))


def _qwen2(hf: Any) -> DecoderConfig:
    return DecoderConfig(**_common(hf, activation=_activation(hf, "hidden_act"), qkv_bias=True,
                                   windows=_windows_by_type(hf)))


def _qwen3(hf: Any) -> DecoderConfig:
    bias = bool(_get(hf, "attention_bias", False))
    return DecoderConfig(**_common(hf, activation=_activation(hf, "hidden_act"), qkv_bias=bias, o_bias=bias,
                                   qk_norm=True, windows=_windows_by_type(hf)))


def _gemma(hf: Any) -> DecoderConfig:
    _no_bidirectional(hf)
    bias = bool(_get(hf, "attention_bias", False))
    return DecoderConfig(**_common(hf, activation=_activation(hf, "hidden_act"), qkv_bias=bias, o_bias=bias,
                                   norm_unit_offset=True, embed_scale=hf.hidden_size ** 0.5,
                                   windows=(None,) * hf.num_hidden_layers))


def _gemma2(hf: Any) -> DecoderConfig:
    _no_bidirectional(hf)
    bias = bool(_get(hf, "attention_bias", False))
    return DecoderConfig(**_common(
        hf, activation=_activation(hf, "hidden_activation"), qkv_bias=bias, o_bias=bias, norm_unit_offset=True,
        embed_scale=hf.hidden_size ** 0.5, sandwich_norms=True, attn_scale=float(_require(hf, "query_pre_attn_scalar")) ** -0.5,
        attn_softcap=_get(hf, "attn_logit_softcapping"), final_softcap=_get(hf, "final_logit_softcapping"),
        windows=_windows_by_type(hf)))


def _gemma3_text(hf: Any) -> DecoderConfig:
    """Gemma 3 (text): q/k norms, one RoPE per layer type; transformers passes no attention soft-cap to its
    attention here (the config field is ignored), so neither do we."""
    _no_bidirectional(hf)
    head_dim = _head_dim(hf)
    bias = bool(_get(hf, "attention_bias", False))
    params = _rope_params(hf)
    types = _get(hf, "layer_types") or ["full_attention"] * hf.num_hidden_layers
    if isinstance(params, dict) and set(types) <= set(params):  # nested: one dict per layer type
        by_type = {t: _rope(hf, params[t], head_dim, f"rope_parameters.{t}") for t in set(types)}
        rope = tuple(by_type[t] for t in types)
    else:
        rope = (_rope(hf, params, head_dim),) * hf.num_hidden_layers
    return DecoderConfig(**_common(
        hf, head_dim=head_dim, rope=rope, activation=_activation(hf, "hidden_activation"), qkv_bias=bias, o_bias=bias,
        norm_unit_offset=True, embed_scale=hf.hidden_size ** 0.5, sandwich_norms=True, qk_norm=True,
        attn_scale=float(_require(hf, "query_pre_attn_scalar")) ** -0.5,
        final_softcap=_get(hf, "final_logit_softcapping"), windows=_windows_by_type(hf)))


def _gemma3(hf: Any) -> DecoderConfig:
    """Gemma 3 with a vision tower (4B and up): its text decoder is Gemma 3's, under `model.language_model.`;
    the decoder trains on text, the vision tower and projector are left out."""
    text = getattr(hf, "text_config", None)
    if text is None:
        raise ModelError("config.json of this gemma3 model has no text_config")
    return dataclasses.replace(_gemma3_text(text), model_type="gemma3", hf_prefix="model.language_model.",
                               hf_ignored=("model.vision_tower.", "model.multi_modal_projector."))


def _phi3(hf: Any) -> DecoderConfig:
    return DecoderConfig(**_common(hf, activation=_activation(hf, "hidden_act"), fused_qkv=True, fused_gate_up=True,
                                   windows=_windows_all(hf), residual_dropout=float(_get(hf, "resid_pdrop", 0.0))))


READERS = {"llama": _llama, "mistral": _mistral, "qwen2": _qwen2, "qwen3": _qwen3, "gemma": _gemma,
           "gemma2": _gemma2, "gemma3_text": _gemma3_text, "gemma3": _gemma3, "phi3": _phi3}
