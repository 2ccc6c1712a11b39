"""RoPE scaling from `model.rope_scaling`: a base pretrained on N tokens trained and run on factor x N.

Why here, once: the scaling is written into the transformers config object before the model is built
(`load_base`) and before the memory plan reads the shape (`load_model_config`), so every consumer sees
the same numbers: transformers' rotary embedding computes them through its `ROPE_INIT_FUNCTIONS`, and
loratune's decoder reads the same `rope_parameters` (`loratune.decoder.config`) and computes them in
`loratune.decoder.rope`. The adapter's run keeps the key (`loratune.yaml`), so chat, serve and export load
the base stretched as it was trained, and a merged export's config.json carries the scaling.

The kinds, as transformers defines them (`rope_parameters` of transformers 5):
- linear: positions divided by `factor` (position interpolation);
- dynamic: NTK-aware; the base grows with the sequence length past max_position_embeddings, which stays the
  pretraining length (nothing changes for shorter sequences);
- yarn: NTK-by-parts interpolation between `beta_fast` and `beta_slow` rotations, cos/sin scaled by the
  attention factor (0.1 ln(factor) + 1 unless given);
- llama3: Llama 3.1's scaling of wavelengths longer than original / low_freq_factor, blended up to
  original / high_freq_factor.
Linear, yarn and llama3 raise max_position_embeddings to original x factor.
"""

from __future__ import annotations

import logging
from typing import Any

from loratune.config import RopeScalingConfig
from loratune.errors import ConfigError, ModelError

log = logging.getLogger(__name__)


def check_rope_scaling(rs: RopeScalingConfig) -> None:
    """Reject impossible values, naming the key (called by `loratune.config.validate`)."""
    if not rs.factor > 1.0:
        raise ConfigError(f"model.rope_scaling.factor must be > 1 (how many times longer the context gets), got "
                          f"{rs.factor}")
    if rs.original_max_position_embeddings < 0:
        raise ConfigError("model.rope_scaling.original_max_position_embeddings must be >= 0 (0: the model's "
                          f"max_position_embeddings), got {rs.original_max_position_embeddings}")
    if rs.type == "llama3" and not 0 < rs.low_freq_factor < rs.high_freq_factor:
        raise ConfigError("model.rope_scaling (llama3) needs 0 < low_freq_factor < high_freq_factor, got "
                          f"{rs.low_freq_factor} and {rs.high_freq_factor}")
    if rs.type == "yarn" and not 0 < rs.beta_slow < rs.beta_fast:
        raise ConfigError(f"model.rope_scaling (yarn) needs 0 < beta_slow < beta_fast, got {rs.beta_slow} and "
                          f"{rs.beta_fast}")
    if rs.attention_factor < 0:
        raise ConfigError(f"model.rope_scaling.attention_factor must be >= 0 (0: yarn's default), got "
                          f"{rs.attention_factor}")


def _current(hf: Any) -> dict:
    """The config's flat rope dict (transformers 5 keeps it in `rope_parameters`)."""
    params = getattr(hf, "rope_parameters", None)
    if params is None:
        params = dict(getattr(hf, "rope_scaling", None) or {})
        params.setdefault("rope_theta", getattr(hf, "rope_theta", None) or 10000.0)
    return dict(params)


def scaled_rope_parameters(hf: Any, rs: RopeScalingConfig) -> tuple[dict, int]:
    """(the new rope_parameters, the new max_position_embeddings) of config `hf` scaled by `rs`."""
    current = _current(hf)
    if current and all(isinstance(v, dict) for v in current.values()):
        raise ModelError(f"model.rope_scaling: this {hf.model_type} model has one RoPE per layer type "
                         f"({', '.join(current)}); loratune scales models with a single RoPE")
    kind = current.get("rope_type", current.get("type", "default"))
    if kind != "default":
        raise ModelError(f"model.rope_scaling: the base's RoPE is already scaled (rope_type {kind!r} in its "
                         "config.json); remove model.rope_scaling or start from an unscaled base")
    max_pos = getattr(hf, "max_position_embeddings", None)
    original = rs.original_max_position_embeddings or max_pos
    if not original:
        raise ModelError("model.rope_scaling: the base's config.json has no max_position_embeddings; set "
                         "model.rope_scaling.original_max_position_embeddings")
    params = {"rope_theta": float(current.get("rope_theta", 10000.0)), "rope_type": rs.type,
              "factor": float(rs.factor)}
    if "partial_rotary_factor" in current:
        params["partial_rotary_factor"] = current["partial_rotary_factor"]
    if rs.type == "dynamic":  # transformers scales from max_position_embeddings, which must stay the original
        return params, int(original)
    if rs.type == "llama3":
        params.update(low_freq_factor=float(rs.low_freq_factor), high_freq_factor=float(rs.high_freq_factor),
                      original_max_position_embeddings=int(original))
    elif rs.type == "yarn":
        params.update(beta_fast=float(rs.beta_fast), beta_slow=float(rs.beta_slow),
                      original_max_position_embeddings=int(original))
        if rs.attention_factor:
            params["attention_factor"] = float(rs.attention_factor)
    return params, int(round(original * rs.factor))


def apply_rope_scaling(hf: Any, rs: RopeScalingConfig | None) -> Any:
    """Scale the RoPE of the transformers config object `hf` (a fresh one this call's caller loaded) in place;
    returns it. `rs` None leaves it as it is."""
    if rs is None:
        return hf
    params, max_pos = scaled_rope_parameters(hf, rs)
    before = getattr(hf, "max_position_embeddings", None)
    hf.rope_parameters = params
    hf.max_position_embeddings = max_pos
    if getattr(hf, "original_max_position_embeddings", None) is not None:  # Phi-3 keeps it beside rope_parameters
        hf.original_max_position_embeddings = params.get("original_max_position_embeddings", before)
    log.info("RoPE scaled: %s x%g, context %s -> %s tokens", rs.type, rs.factor, before, max_pos)
    return hf


def context_length(hf: Any) -> int | None:
    """The context the model (as configured, scaling applied) is meant for: max_position_embeddings, or for
    dynamic NTK, which has no fixed limit, factor x max_position_embeddings."""
    max_pos = getattr(hf, "max_position_embeddings", None)
    if max_pos is None:
        return None
    params = _current(hf)
    if params.get("rope_type") == "dynamic":
        return int(round(max_pos * float(params.get("factor", 1.0))))
    return int(max_pos)


def scaled_config(source: str, mcfg: Any, local_files_only: bool) -> Any:
    """The base's transformers config (from `source`, a located folder or hub id) with `mcfg.rope_scaling`
    applied, for `from_pretrained(config=...)`."""
    from transformers import AutoConfig

    try:
        hf = AutoConfig.from_pretrained(source, revision=mcfg.revision, local_files_only=local_files_only,
                                        trust_remote_code=mcfg.trust_remote_code)
    except (OSError, ValueError) as e:
        raise ModelError(f"cannot read the model config of {source!r}: {e}".splitlines()[0]) from None
    return apply_rope_scaling(hf, mcfg.rope_scaling)
