"""A 4-bit weight as plain tensors (`loratune.decoder.plain_nf4`, what FSDP shards): the layer dequantizes the
very bytes bitsandbytes holds to the very same values, and computes the same outputs and LoRA gradients."""

from __future__ import annotations

import bitsandbytes as bnb
import pytest
import torch
from torch import nn

from loratune.decoder.lora import QLoRALinear
from loratune.decoder.plain_nf4 import PlainNF4, make_plain


def _quantized(quant_type: str, nested: bool) -> nn.Parameter:
    w = torch.randn(48, 128, generator=torch.Generator().manual_seed(0))
    p = bnb.nn.Params4bit(w, requires_grad=False, quant_type=quant_type, compress_statistics=nested)
    return p._quantize("cpu") if not p.bnb_quantized else p


@pytest.mark.parametrize("quant_type, nested", [("nf4", True), ("nf4", False), ("fp4", False)])
def test_plain_tensors_dequantize_and_train_as_bitsandbytes(quant_type: str, nested: bool) -> None:
    weight = _quantized(quant_type, nested)
    expected = bnb.functional.dequantize_4bit(weight.data, weight.quant_state).float()
    ref, plain = QLoRALinear(weight, compute_dtype=torch.float32), QLoRALinear(weight, compute_dtype=torch.float32)
    for layer in (ref, plain):
        layer.add_adapter(4, 8, generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            layer.lora_B.normal_(generator=torch.Generator().manual_seed(2))
    assert make_plain(plain) and not make_plain(plain)  # a second call finds no bitsandbytes weight
    assert isinstance(plain.nf4, PlainNF4) and type(plain.weight) is nn.Parameter
    assert getattr(plain.weight, "quant_state", None) is None and plain.weight.dtype == torch.uint8
    frozen = [n for n, p in plain.named_parameters() if not p.requires_grad]
    assert sorted(frozen) == sorted(["weight", "nf4.absmax"] + (["nf4.absmax2"] if nested else []))
    assert torch.equal(plain.weight_fn(torch.float32), expected)
    assert torch.equal(ref.weight_fn(torch.float32), expected)
    x = torch.randn(5, 128, generator=torch.Generator().manual_seed(3))
    y_ref, y = ref(x), plain(x)
    assert torch.equal(y_ref, y)
    y_ref.square().sum().backward()
    y.square().sum().backward()
    assert torch.equal(ref.lora_A.grad, plain.lora_A.grad) and torch.equal(ref.lora_B.grad, plain.lora_B.grad)
