"""How LoRA adapters start (`adapter.init`), and how adapters that changed their base are saved.

    default     A Kaiming-uniform, B = 0 (peft's default; the adapter starts as a no-op)
    gaussian    A ~ N(0, 1/r), B = 0 (peft's `init_lora_weights="gaussian"`)
    pissa       PiSSA (Meng et al. 2024): A, B from the top r singular vectors of W; the base becomes the
                residual W - s B A (s = the LoRA scale), so the model is unchanged at step 0
    pissa_niter_N  the same from a randomized SVD (N subspace iterations): fast on large matrices
    olora       OLoRA (Büyükakyüz 2024): B, A the first r columns of Q and rows of R of W = QR; base W - s B A
    loftq       LoftQ (Li et al. 2023) for a 4-bit base, as peft's `replace_lora_weights_loftq` does it: the
                base stays the ordinary NF4 quantization Q(W), and the adapter starts at the best rank-r
                approximation of the quantization error, s B A = SVD_r(W - Q(W)), so base + adapter is closer
                to the original weights than the 4-bit base alone. W is read from the checkpoint's
                safetensors files.
    eva         EVA: A from the principal directions of each layer's inputs on training data, B = 0
                (data-driven: `loratune.model.eva`, applied by the run once the data is read)

The arithmetic follows peft (`LoraLayer.pissa_init`, `olora_init`, `loftq_utils._low_rank_decomposition`),
written here once for both model codes: loratune's decoder gets its factors from these functions, and the
tests compare them with peft's own on the same weights. One difference, on purpose: peft's LoftQ replacement
ignores the LoRA scale (B A = the error, so s B A is the error only at alpha = r); here s B A is the error at
any alpha.

PiSSA and OLoRA change the base weights, so their adapter alone does not apply to the original base. What a
run saves is therefore converted (as peft's `path_initial_model_for_weight_conversion` does): the trained
change of the model is s (B A - B0 A0) = s' [B | -B0] [A ; A0], a plain LoRA adapter of rank 2r with
alpha doubled (x sqrt 2 with rsLoRA, keeping the scale), which `PeftModel.from_pretrained` applies to the
original base and loratune's chat, serve and export read like any adapter. A resumed run reads its own
rank-r half back (`unconverted`), checking that the other half is this run's initialisation.
"""

from __future__ import annotations

import json
import math
import re
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from loratune.errors import ConfigError, ModelError

INITS = ("default", "gaussian", "pissa", "pissa_niter_N", "olora", "loftq", "eva")
_PATTERN = re.compile(r"^(default|gaussian|pissa|pissa_niter_[1-9][0-9]*|olora|loftq|eva)$")
CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"


def check_init(init: str, bits: int, adapter_type: str, method: str = "sft", strategy: str = "auto") -> None:
    """Refuse an `adapter.init` that is unknown or cannot work with the base's precision or the method."""
    if not _PATTERN.match(init):
        raise ConfigError(f"config key 'adapter.init': got {init!r}, expected one of {', '.join(INITS)} "
                          "(N a number of iterations, e.g. pissa_niter_4)")
    if init != "default" and adapter_type != "lora":
        raise ConfigError(f"adapter.init {init!r} initialises LoRA adapters: it needs adapter.type lora")
    if changes_base(init) and bits <= 8:
        raise ConfigError(f"adapter.init {init!r} moves the adapter's part of each weight out of the base, which a "
                          f"{bits}-bit base cannot hold exactly: use quantization.bits 16 or 32, or adapter.init "
                          "loftq for a 4-bit base")
    if changes_base(init) and method in ("dpo", "kto"):
        raise ConfigError(f"adapter.init {init!r} leaves a residual base, so the base with the adapter disabled (the "
                          f"reference policy of train.method {method}) is not the model you started from: use "
                          "adapter.init default, gaussian, loftq or eva")
    if changes_base(init) and strategy == "fsdp":
        raise ConfigError(f"adapter.init {init!r} is not available with train.strategy fsdp yet (its saved adapter is "
                          "converted to rank 2r, which the sharded resume does not read back): use train.strategy ddp")
    if init == "loftq" and bits != 4:
        raise ConfigError(f"adapter.init loftq absorbs the 4-bit quantization error into the adapter: it needs "
                          f"quantization.bits 4, got {bits}")


def changes_base(init: str) -> bool:
    """Whether the initialisation moves part of the base weights into the adapter (PiSSA, OLoRA)."""
    return init == "olora" or init.startswith("pissa")


def peft_init_value(init: str) -> bool | str:
    """`LoraConfig.init_lora_weights` for `adapter.init` on the transformers path (loftq is applied afterwards)."""
    return {"default": True, "loftq": True, "eva": True}.get(init, init)


# ------------------------------------------------------------------------------------------------ factors


def pissa_factors(weight: Tensor, rank: int, scale: float, niter: int | None = None) -> tuple[Tensor, Tensor]:
    """(A [r, in], B [out, r]) of PiSSA: W's top r singular triplets, sqrt(S / scale) on each side."""
    w = weight.to(torch.float32)
    if niter is None:
        u, s, vh = torch.linalg.svd(w, full_matrices=False)
        u, s, vh = u[:, :rank], s[:rank], vh[:rank]
    else:
        u, s, v = torch.svd_lowrank(w, rank, niter=niter)
        vh = v.t()
    root = torch.sqrt(s / scale)
    return root[:, None] * vh, u * root[None, :]


def olora_factors(weight: Tensor, rank: int) -> tuple[Tensor, Tensor]:
    """(A [r, in], B [out, r]) of OLoRA: W = QR, B the first r columns of Q, A the first r rows of R."""
    q, r = torch.linalg.qr(weight.to(torch.float32))
    return r[:rank].contiguous(), q[:, :rank].contiguous()


def loftq_factors(weight: Tensor, quantized: Tensor, rank: int, scale: float) -> tuple[Tensor, Tensor]:
    """(A [r, in], B [out, r]) with scale B A the best rank-r approximation of W - Q(W)."""
    error = (weight.to(torch.float32) - quantized.to(torch.float32)) / scale
    u, s, vh = torch.linalg.svd(error, full_matrices=False)
    root = torch.sqrt(s[:rank])
    return root[:, None] * vh[:rank], u[:, :rank] * root[None, :]


def gaussian_a(rank: int, in_features: int, generator: torch.Generator | None = None,
               device: torch.device | str | None = None) -> Tensor:
    """peft's gaussian A: N(0, 1/r)."""
    return torch.randn(rank, in_features, generator=generator, device=device) / rank


def residual(weight: Tensor, a: Tensor, b: Tensor, scale: float) -> Tensor:
    """W - scale B A in W's dtype: the base that PiSSA/OLoRA leave behind."""
    return (weight.to(torch.float32) - scale * (b @ a)).to(weight.dtype)


def dequantized(weight: Tensor) -> Tensor:
    """A bitsandbytes 4-bit weight as fp32 (bitsandbytes' own dequantization), a dense one as it is."""
    state = getattr(weight, "quant_state", None)
    if state is None:
        return weight.detach().to(torch.float32)
    import bitsandbytes.functional as bnbf

    return bnbf.dequantize_4bit(weight.data, state).to(torch.float32)


def factors(init: str, weight: Tensor, rank: int, scale: float,
            original: Callable[[], Tensor] | None = None) -> tuple[Tensor, Tensor] | None:
    """The (A, B) of the data-free initialisations that depend on the weight; None for default/gaussian.
    `original`: the full-precision weight (loftq)."""
    if init == "olora":
        return olora_factors(dequantized(weight), rank)
    if init.startswith("pissa"):
        niter = int(init.rsplit("_", 1)[1]) if "_niter_" in init else None
        return pissa_factors(dequantized(weight), rank, scale, niter)
    if init == "loftq":
        if original is None:
            raise ModelError("adapter.init loftq needs the base's full-precision weights")
        return loftq_factors(original(), dequantized(weight), rank, scale)
    return None


# --------------------------------------------------------------------------------- original weights (loftq)


class OriginalWeights:
    """The checkpoint's own tensors, read by name from its safetensors files (one or sharded), one at a time."""

    def __init__(self, folder: str | Path) -> None:
        from safetensors import safe_open

        self.folder = Path(folder)
        files = sorted(self.folder.glob("*.safetensors"))
        if not files:
            raise ModelError(f"adapter.init loftq reads the base's full-precision weights from its safetensors "
                             f"files, and {self.folder} has none")
        self.where: dict[str, Path] = {}
        for f in files:
            with safe_open(str(f), framework="pt") as st:
                for k in st.keys():
                    self.where[k] = f

    def get(self, name: str) -> Tensor:
        from safetensors import safe_open

        if name not in self.where:
            raise ModelError(f"{self.folder}: no tensor {name!r} in its safetensors files (adapter.init loftq)")
        with safe_open(str(self.where[name]), framework="pt") as st:
            return st.get_tensor(name).to(torch.float32)


def checkpoint_folder(path: str, revision: str | None) -> Path:
    """The local folder of the base checkpoint `path` (resolved from demo://, or a hub id in the local cache)."""
    from loratune.model.hub import locate
    from loratune.model.load import resolve_model_path

    where = locate(resolve_model_path(path), revision)
    if Path(where.path).is_dir():
        return Path(where.path)
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(where.path, revision=revision, local_files_only=True))


# ------------------------------------------------------------------------------- saving PiSSA/OLoRA adapters


@dataclass
class InitialAdapter:
    """The adapter weights as initialised ({peft tensor name: tensor}, as saved), kept to convert what is saved."""

    tensors: dict[str, Tensor]
    rslora: bool


def convert_saved(folder: Path, initial: InitialAdapter) -> None:
    """Rewrite the PiSSA/OLoRA adapter saved in `folder` as the plain LoRA adapter of the same model change on the
    original base: [A ; A0], [B | -B0], rank and alpha doubled (alpha x sqrt 2 with rsLoRA)."""
    from safetensors.torch import load_file, save_file

    saved = load_file(str(folder / WEIGHTS_FILE))
    out = {}
    for name, t in saved.items():
        if name not in initial.tensors:
            raise ModelError(f"{folder / WEIGHTS_FILE}: {name} has no initial value to convert against")
        t0 = initial.tensors[name].to(t.dtype)
        out[name] = torch.cat([t, t0], 0) if ".lora_A." in name else torch.cat([t, -t0], 1)
    factor = math.sqrt(2) if initial.rslora else 2.0
    path = folder / CONFIG_FILE
    config = json.loads(path.read_text(encoding="utf-8"))
    config["r"] = 2 * config["r"]
    config["lora_alpha"] = config["lora_alpha"] * factor
    config["rank_pattern"] = {k: 2 * v for k, v in (config.get("rank_pattern") or {}).items()}
    config["alpha_pattern"] = {k: v * factor for k, v in (config.get("alpha_pattern") or {}).items()}
    config["init_lora_weights"] = True  # loading must not run PiSSA on the base again
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    save_file(out, str(folder / WEIGHTS_FILE), metadata={"format": "pt"})


@contextmanager
def unconverted(folder: Path, initial: InitialAdapter) -> Iterator[Path]:
    """A temporary folder holding the rank-r adapter of this run from the converted one in `folder` (resume),
    after checking that its other half is this run's initialisation."""
    from safetensors.torch import load_file, save_file

    saved = load_file(str(folder / WEIGHTS_FILE))
    out = {}
    for name, t in saved.items():
        t0 = initial.tensors.get(name)
        if t0 is None:
            raise ModelError(f"{folder / WEIGHTS_FILE}: unexpected tensor {name} (was adapter.* changed?)")
        r = t0.shape[0] if ".lora_A." in name else t0.shape[1]
        mine, init = (t[:r], t[r:]) if ".lora_A." in name else (t[:, :r], -t[:, r:])
        if init.shape != t0.shape or not torch.allclose(init, t0.to(init.dtype), rtol=1e-5, atol=1e-6):
            raise ModelError(f"{folder}: the adapter was not initialised as this run initialises it ({name}); "
                             "was the base or adapter.init changed?")
        out[name] = mine.contiguous()
    with tempfile.TemporaryDirectory(prefix="loratune-unconverted-") as tmp:
        config = json.loads((folder / CONFIG_FILE).read_text(encoding="utf-8"))
        factor = math.sqrt(2) if initial.rslora else 2.0
        config["r"] //= 2
        config["lora_alpha"] /= factor
        config["rank_pattern"] = {k: v // 2 for k, v in (config.get("rank_pattern") or {}).items()}
        config["alpha_pattern"] = {k: v / factor for k, v in (config.get("alpha_pattern") or {}).items()}
        (Path(tmp) / CONFIG_FILE).write_text(json.dumps(config), encoding="utf-8")
        save_file(out, str(Path(tmp) / WEIGHTS_FILE), metadata={"format": "pt"})
        yield Path(tmp)


# ------------------------------------------------------------------------------------------ applying them


def _originals(init: str, model_path: str, revision: str | None) -> OriginalWeights | None:
    return OriginalWeights(checkpoint_folder(model_path, revision)) if init == "loftq" else None


@torch.no_grad()
def init_decoder(decoder, init: str, model_path: str, revision: str | None = None) -> InitialAdapter | None:
    """Initialise the adapters of loratune's decoder as `init` says (after `Decoder.add_adapters`, whose default
    initialisation they replace); returns the initial adapter where the base changed (PiSSA, OLoRA), else None."""
    from loratune.decoder.keys import PEFT_PREFIX

    if init in ("default", "eva"):  # eva is data-driven: loratune.model.eva, once the data is read
        return None
    originals = _originals(init, model_path, revision)
    kept: dict[str, Tensor] = {}
    rslora = False
    for name, layer in decoder.adapted_layers().items():
        hf = decoder.hf_name(name)
        if init == "gaussian":
            a = gaussian_a(layer.rank, layer.in_features, device=layer.lora_A.device)
            b = torch.zeros_like(layer.lora_B)
        else:
            a, b = factors(init, layer.weight, layer.rank, layer.scale,
                           None if originals is None else (lambda hf=hf: originals.get(hf + ".weight")))
        layer.set_adapter_weights(a.to(layer.lora_A.device), b.to(layer.lora_B.device))
        if changes_base(init):
            layer.weight.data.copy_(residual(layer.weight, layer.lora_A, layer.lora_B, layer.scale))
            kept[f"{PEFT_PREFIX}{hf}.lora_A.weight"] = layer.lora_A.detach().to("cpu", torch.float32).clone()
            kept[f"{PEFT_PREFIX}{hf}.lora_B.weight"] = layer.lora_B.detach().to("cpu", torch.float32).clone()
            rslora = layer.rslora
    decoder.track_adapters()
    return InitialAdapter(kept, rslora) if kept else None


@torch.no_grad()
def init_peft(model, init: str, model_path: str, revision: str | None = None,
              rslora: bool = False) -> InitialAdapter | None:
    """After peft attached the adapters (`LoraConfig.init_lora_weights` already did gaussian, PiSSA and OLoRA):
    LoftQ's factors on every 4-bit LoRA layer; returns the initial adapter where the base changed."""
    if init == "loftq":
        from peft.tuners.lora import LoraLayer

        originals = _originals(init, model_path, revision)
        prefix = "base_model.model."
        for name, module in model.named_modules():
            if not isinstance(module, LoraLayer) or "default" not in module.lora_A:
                continue
            base = module.get_base_layer()
            if getattr(base.weight, "quant_state", None) is None:
                continue
            a, b = loftq_factors(originals.get(name.removeprefix(prefix) + ".weight"), dequantized(base.weight),
                                 module.r["default"], module.scaling["default"])
            module.lora_A["default"].weight.copy_(a)
            module.lora_B["default"].weight.copy_(b)
    if not changes_base(init):
        return None
    from peft import get_peft_model_state_dict

    state = get_peft_model_state_dict(model)
    return InitialAdapter({k: v.detach().to("cpu", torch.float32).clone() for k, v in state.items()}, rslora)
