"""HQQ bases: a loaded model's linear layers quantized to 2, 3, 4 or 8 bits with HQQ, and back.

HQQ (half-quadratic quantization, the `hqq` package) needs no calibration data and runs in plain PyTorch, on CPU
too. transformers ships an `HqqConfig`, but its quantize-on-load path does not run in transformers 5 (its
quantizer has no load operations yet: "HQQ is not available yet"), so loratune loads the base in the compute
dtype and replaces each linear layer (the output head excepted, as transformers' integration does) by hqq's
public `HQQLinear`, built from that layer. peft has LoRA layers for `HQQLinear` (`peft.tuners.lora.hqq`), so the
adapters, their saving (a standard PEFT adapter, the base recorded as the original checkpoint) and
`PeftModel.from_pretrained` on a base quantized the same way work as they ship. HQQ's quantization is a
deterministic optimization of each weight, so the base quantized again at reload is the one trained on.

Gradients: `HQQLinear`'s default backend (`forward_pytorch_backprop`) dequantizes the weight in its forward and
backward and passes the gradient to its input, which is what LoRA on top needs.
"""

from __future__ import annotations

from torch import nn

from loratune.errors import ModelError

INSTALL = "pip install 'loratune[hqq]' (or: pip install hqq)"

# bits -> (stored bits per weight, hqq's packing): 3-bit packs ten values into one int32 (3.2 bits each)
PACKED_BITS = {8: 8.0, 4: 4.0, 3: 3.2, 2: 2.0, 1: 1.0}


def hqq_linear_type() -> type | None:
    """hqq's `HQQLinear`, or None when the `hqq` package is not installed."""
    try:
        from hqq.core.quantize import HQQLinear
    except ImportError:
        return None
    return HQQLinear


def require_hqq() -> type:
    """`HQQLinear`, or a ModelError that says what to install."""
    cls = hqq_linear_type()
    if cls is None:
        raise ModelError(f"quantization.method hqq needs the hqq package: {INSTALL}")
    return cls


def bytes_per_weight(bits: int, group_size: int, meta_bytes: int) -> float:
    """Bytes one quantized weight costs: its packed bits plus its group's scale and zero point (each `meta_bytes`,
    the compute dtype's size: hqq keeps them unquantized), shared by `group_size` weights."""
    return PACKED_BITS[bits] / 8 + 2 * meta_bytes / group_size


def quantize_hqq(model: nn.Module, bits: int, group_size: int, compute_dtype, device: str) -> int:
    """Replace every linear layer of `model` except its output head by an `HQQLinear` of `bits` bits in groups
    of `group_size` input weights (axis 1, as transformers' `HqqConfig` picks), on `device`; returns how many.

    A layer whose input size `group_size` does not divide is an error naming it (hqq would fail deep inside)."""
    hqq_linear = require_hqq()
    from hqq.core.quantize import BaseQuantizeConfig

    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    linears = [(name, mod) for name, mod in model.named_modules() if type(mod) is nn.Linear and mod is not head]
    for name, mod in linears:
        if mod.in_features % group_size:
            raise ModelError(f"quantization.group_size {group_size} does not divide the input size "
                             f"{mod.in_features} of {name}; pick a divisor of it (e.g. 32 or 64)")
    config = BaseQuantizeConfig(nbits=bits, group_size=group_size, axis=1)
    for name, mod in linears:
        model.set_submodule(name, hqq_linear(mod, config, compute_dtype=compute_dtype, device=device))
    return len(linears)


def hqq_layers(model: nn.Module) -> list[str]:
    """Names of the `HQQLinear` layers in `model` (none when hqq is not installed)."""
    cls = hqq_linear_type()
    return [] if cls is None else [n for n, m in model.named_modules() if isinstance(m, cls)]


def dequantize_hqq(model: nn.Module, dtype) -> int:
    """Replace every `HQQLinear` of `model` by a plain `nn.Linear` holding its dequantized weight in `dtype` (the
    base a merged export is built on: the weights the adapter was trained against); returns how many."""
    names = hqq_layers(model)
    for name in names:
        q = model.get_submodule(name)
        weight = q.dequantize().to(dtype)
        linear = nn.Linear(weight.shape[1], weight.shape[0], bias=q.bias is not None, device=weight.device,
                           dtype=dtype)
        linear.weight.data = weight
        if q.bias is not None:
            linear.bias.data = q.bias.detach().to(dtype)
        linear.requires_grad_(False)
        model.set_submodule(name, linear)
    return len(names)


def hqq_weights(model: nn.Module) -> dict[int, tuple[int, str]]:
    """For each `HQQLinear` of `model`, keyed by the id of its packed weight tensor: how many weights it holds (the
    packed tensor has fewer elements) and what they are, e.g. "3-bit HQQ (groups of 64)"."""
    cls = hqq_linear_type()
    if cls is None:
        return {}
    return {id(m.W_q): (int(m.meta["shape"].numel()), f"{m.meta['nbits']}-bit HQQ (groups of {m.meta['group_size']})")
            for m in model.modules() if isinstance(m, cls) and m.W_q is not None}
