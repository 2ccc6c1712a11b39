"""Adapters in PEFT's format: `adapter_config.json` + `adapter_model.safetensors`, peft's names for the HF model.

What we write is what `peft.PeftModel.from_pretrained(hf_model, folder)` loads: the LoRA config written by
peft's own `LoraConfig.save_pretrained`, and tensors named `base_model.model.<HF module>.lora_A.weight` /
`.lora_B.weight` (fp32), the HF module names coming from `loratune.decoder.keys`. What we read is what peft
saves for these models, LoRA only: rank per module from the tensors (checked against `r`/`rank_pattern`),
scale from `lora_alpha`/`alpha_pattern` and `use_rslora`. Anything the decoder cannot apply (DoRA, LoRA
biases, modules_to_save, trainable tokens, a module it does not own) is a `ModelError` naming it.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch

from loratune.decoder.keys import PEFT_PREFIX, linear_names, our_module_name
from loratune.decoder.model import Decoder
from loratune.errors import ModelError

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
_KEY = re.compile(r"^" + re.escape(PEFT_PREFIX) + r"(.+)\.lora_([AB])\.weight$")


def pattern_value(patterns: dict, module: str, default):
    """peft's rank_pattern/alpha_pattern lookup: the first key matching the end of the module name."""
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def target_modules(decoder: Decoder, hf_names: list[str]) -> list[str] | str:
    """Leaf names when they pick exactly the adapted modules (a readable config, as loratune's adapters.py
    writes it), else the full module names. Beside a vision tower (whose modules share the leaf names) the
    leaves are scoped to the text decoder by a regular expression, which peft matches in full."""
    leaves = sorted({n.rsplit(".", 1)[-1] for n in hf_names})
    every = [decoder.hf_name(n) for n in linear_names(decoder.config)]
    picked = [n for n in every if n.rsplit(".", 1)[-1] in leaves]
    if sorted(picked) != sorted(hf_names):
        return sorted(hf_names)
    if decoder.config.hf_ignored:
        return re.escape(decoder.config.hf_prefix) + r"layers\.\d+\.(self_attn|mlp)\.(" + "|".join(leaves) + ")"
    return leaves


def save_adapter(decoder: Decoder, folder: str | Path, base_model_name_or_path: str | None = None) -> Path:
    """Write the decoder's adapters to `folder` in PEFT format; returns the folder."""
    from peft import LoraConfig
    from safetensors.torch import save_file

    adapted = decoder.adapted_layers()
    if not adapted:
        raise ModelError("the decoder has no adapters to save")
    tensors, hf_names = {}, []
    for name, m in adapted.items():
        hf = decoder.hf_name(name)
        hf_names.append(hf)
        for leaf, w in (("A", m.lora_A), ("B", m.lora_B)):
            t = w.detach().to("cpu", torch.float32).contiguous()
            if not torch.isfinite(t).all():
                raise ModelError(f"refusing to save: the adapter of {hf} (lora_{leaf}) holds NaN or inf")
            tensors[f"{PEFT_PREFIX}{hf}.lora_{leaf}.weight"] = t
    if len({m.rslora for m in adapted.values()}) != 1:
        raise ModelError("adapters mixing rsLoRA and plain LoRA scaling cannot be written as one peft config")
    rank = Counter(m.rank for m in adapted.values()).most_common(1)[0][0]
    alpha = Counter(m.alpha for m in adapted.values()).most_common(1)[0][0]
    first = next(iter(adapted.values()))
    config = LoraConfig(
        r=rank, lora_alpha=alpha, lora_dropout=first.dropout, use_rslora=first.rslora,
        target_modules=target_modules(decoder, hf_names), bias="none", task_type="CAUSAL_LM",
        rank_pattern={decoder.hf_name(n): m.rank for n, m in adapted.items() if m.rank != rank},
        alpha_pattern={decoder.hf_name(n): m.alpha for n, m in adapted.items() if m.alpha != alpha},
        base_model_name_or_path=base_model_name_or_path,
    )
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(str(out))
    save_file(tensors, str(out / WEIGHTS_FILE), metadata={"format": "pt"})
    return out


def _read_config(folder: Path) -> dict:
    path = folder / CONFIG_FILE
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ModelError(f"{path} does not exist: not a PEFT adapter folder") from None
    except ValueError as e:
        raise ModelError(f"{path} is not valid JSON: {e}") from None
    if config.get("peft_type") != "LORA":
        raise ModelError(f"{path}: peft_type {config.get('peft_type')!r}; loratune's decoder loads LORA adapters")
    refused = {"use_dora": "DoRA", "lora_bias": "LoRA biases", "modules_to_save": "modules_to_save",
               "trainable_token_indices": "trainable tokens", "layer_replication": "layer replication",
               "fan_in_fan_out": "fan_in_fan_out", "target_parameters": "target_parameters"}
    for key, what in refused.items():
        if config.get(key):
            raise ModelError(f"{path}: {key} is set ({what}); loratune's decoder does not apply it (the HF + peft "
                             "path does)")
    if config.get("bias", "none") != "none":
        raise ModelError(f"{path}: bias={config['bias']!r}; loratune's decoder trains no biases (expected 'none')")
    return config


@dataclass(frozen=True)
class LayerLoRA:
    """One layer's LoRA weights as a PEFT folder holds them: A [r, in], B [out, r] (on the host), rank, alpha."""

    lora_A: torch.Tensor
    lora_B: torch.Tensor
    rank: int
    alpha: float


@dataclass(frozen=True)
class AdapterFile:
    """A PEFT LoRA adapter read and checked against a decoder, not yet put on it: our layer name -> weights."""

    folder: Path
    layers: dict[str, LayerLoRA]
    dropout: float
    rslora: bool


def read_adapter(decoder: Decoder, folder: str | Path) -> AdapterFile:
    """Read the PEFT adapter in `folder` and check it fits `decoder` (its modules are projections of it, ranks as
    the config says, A and B shaped for each layer); the decoder is not changed."""
    from safetensors.torch import load_file

    folder = Path(folder)
    config = _read_config(folder)
    path = folder / WEIGHTS_FILE
    if not path.is_file():
        raise ModelError(f"{path} does not exist (loratune reads adapters saved as safetensors)")
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in load_file(str(path)).items():
        m = _KEY.match(key)
        if m is None:
            raise ModelError(f"{path}: tensor {key!r} is not a LoRA A/B weight of a module; loratune's decoder loads "
                             "plain LoRA adapters")
        pairs.setdefault(m.group(1), {})[m.group(2)] = tensor
    layers = decoder.linear_layers()
    out: dict[str, LayerLoRA] = {}
    for hf, ab in sorted(pairs.items()):
        ours = our_module_name(hf, decoder.config.hf_prefix)
        if ours not in layers:
            raise ModelError(f"{path}: the adapter has weights for {hf!r}, which is not a projection of this "
                             f"{decoder.config.model_type} decoder")
        if set(ab) != {"A", "B"}:
            raise ModelError(f"{path}: {hf!r} has lora_{next(iter(ab))} but not its pair")
        rank = ab["A"].shape[0]
        want = pattern_value(config.get("rank_pattern"), hf, config.get("r"))
        if want is not None and rank != want:
            raise ModelError(f"{path}: {hf!r} has a rank-{rank} adapter; the config says r={want}")
        layer = layers[ours]
        want_a, want_b = (rank, layer.in_features), (layer.out_features, rank)
        if tuple(ab["A"].shape) != want_a or tuple(ab["B"].shape) != want_b:
            raise ModelError(f"{path}: {hf!r} has LoRA weights of shapes {tuple(ab['A'].shape)}, "
                             f"{tuple(ab['B'].shape)}; this decoder's {layer.in_features} -> {layer.out_features} "
                             f"layer needs {want_a}, {want_b} (an adapter of another base model?)")
        alpha = pattern_value(config.get("alpha_pattern"), hf, config.get("lora_alpha", 8))
        out[ours] = LayerLoRA(ab["A"], ab["B"], int(rank), float(alpha))
    if not out:
        raise ModelError(f"{path} holds no LoRA weights")
    return AdapterFile(folder, out, float(config.get("lora_dropout") or 0.0), bool(config.get("use_rslora")))


def load_adapter(decoder: Decoder, folder: str | Path) -> list[str]:
    """Put the PEFT adapter in `folder` on the decoder (replacing any adapters it has); returns our names of
    the adapted layers."""
    adapter = read_adapter(decoder, folder)
    layers = decoder.linear_layers()
    for layer in layers.values():
        layer.remove_adapter()
    for ours, w in adapter.layers.items():
        layer = layers[ours]
        layer.add_adapter(w.rank, w.alpha, adapter.dropout, adapter.rslora, decoder.casts)
        layer.set_adapter_weights(w.lora_A, w.lora_B)
    decoder.track_adapters()
    return list(adapter.layers)


def copy_adapter_weights(decoder: Decoder, folder: str | Path) -> None:
    """Copy the LoRA weights of the PEFT adapter in `folder` into the decoder's own adapter tensors, in place.

    For resuming: the parameters stay the same objects (an optimizer holds them), so the file must hold
    exactly the adapters the decoder has, of the same shapes; anything else is a `ModelError` naming it."""
    from safetensors.torch import load_file

    path = Path(folder) / WEIGHTS_FILE
    if not path.is_file():
        raise ModelError(f"{path} does not exist (loratune reads adapters saved as safetensors)")
    saved = load_file(str(path))
    adapted = decoder.adapted_layers()
    want = {f"{PEFT_PREFIX}{decoder.hf_name(n)}.lora_{x}.weight": (n, x) for n in adapted for x in "AB"}
    missing, extra = sorted(set(want) - set(saved)), sorted(set(saved) - set(want))
    if missing or extra:
        raise ModelError(f"{path} does not hold this run's adapters: " + "; ".join(
            part for part in (f"missing {missing[:2]}" if missing else "", f"unexpected {extra[:2]}" if extra else "")
            if part) + " (was adapter.* changed?)")
    for key, (name, x) in want.items():
        target = getattr(adapted[name], f"lora_{x}")
        if tuple(saved[key].shape) != tuple(target.shape):
            raise ModelError(f"{path}: {key} has shape {tuple(saved[key].shape)}, this run's adapter "
                             f"{tuple(target.shape)} (was adapter.rank changed?)")
        with torch.no_grad():
            target.copy_(saved[key])
