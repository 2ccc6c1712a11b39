"""Checkpoints saved already quantized: which method their config.json names, and what loading them needs.

A folder whose config.json holds a `quantization_config` loads with its own settings (quantization.* does not
apply). bitsandbytes checkpoints (e.g. `export --quantize-4bit`) load with the packages loratune always has.
GPTQ and AWQ checkpoints load through transformers' integrations, which in transformers 5 need GPT-QModel
(`gptqmodel`, whose quantized linear layers peft adapts: `peft.tuners.lora.gptq` / `awq`) and, for GPTQ,
`optimum`; without them transformers fails deep inside loading, so the check here says what to install first.
Such a base trains through transformers + peft (loratune's decoder reads bitsandbytes 4-bit weights only).
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

from loratune.errors import ModelError

# quant_method -> the packages transformers 5 needs to load it (import names)
NEEDS: dict[str, tuple[str, ...]] = {
    "bitsandbytes": (),
    "gptq": ("optimum", "gptqmodel"),
    "awq": ("gptqmodel",),
}
INSTALL = {"gptqmodel": "gptqmodel (GPT-QModel)", "optimum": "optimum"}


def saved_quant_method(source: str | Path) -> str | None:
    """The `quant_method` of the quantization_config in the local folder's config.json (None: not quantized, or
    not a readable local folder; a hub id is checked by transformers as it loads)."""
    config = Path(source) / "config.json"
    try:
        data = json.loads(config.read_text(encoding="utf-8")) if config.is_file() else {}
    except (OSError, ValueError):
        return None
    q = data.get("quantization_config") if isinstance(data, dict) else None
    if not isinstance(q, dict):
        return None
    return str(q.get("quant_method", "unknown")).lower()


def check_prequantized(source: str | Path) -> str | None:
    """The saved checkpoint's quant_method (None if it is not quantized), after checking this environment can
    load it: a ModelError names the missing packages, or the method loratune does not train on."""
    method = saved_quant_method(source)
    if method is None:
        return None
    if method not in NEEDS:
        raise ModelError(f"{source}: config.json's quantization_config has quant_method {method!r}; loratune trains "
                         f"on checkpoints saved with {', '.join(sorted(NEEDS))} (or quantizes a 16/32-bit one itself: "
                         "quantization.method bitsandbytes or hqq)")
    missing = [p for p in NEEDS[method] if importlib.util.find_spec(p) is None]
    if missing:
        raise ModelError(f"{source} is a {method.upper()} checkpoint (config.json's quantization_config); loading it "
                         f"through transformers needs {' and '.join(INSTALL[p] for p in missing)}: pip install "
                         f"{' '.join(missing)} (see docs/methods.md, Quantized bases)")
    return method


def trains_on_decoder(method: str | None) -> bool:
    """Whether loratune's decoder can take the weights of a checkpoint saved with `method` (bitsandbytes only)."""
    return method in (None, "bitsandbytes")
