"""A 4-bit base weight held as plain tensors, so FSDP can shard it like any other parameter.

bitsandbytes keeps a 4-bit weight as a `Params4bit` (packed uint8) whose quantization constants live on the
tensor object (`quant_state`). FSDP2 (`torch.distributed.fsdp.fully_shard`) replaces every parameter by a
sharded DTensor and, before each use, by a freshly all-gathered plain tensor: the `quant_state` does not
survive either step. Answer.AI's FSDP + QLoRA stores the packed bytes in the compute dtype
(`bnb_4bit_quant_storage`) and keeps the constants on the module. loratune's decoder dequantizes the
weights itself (`loratune.kernels.nf4`), so here the constants simply become tensors of the layer:

    layer.weight        packed uint8 [n/2, 1], frozen   (sharded by FSDP along dim 0)
    layer.nf4.absmax    one scale per block of 64 values: uint8 when double-quantized, else fp32, frozen
    layer.nf4.absmax2   the fp32 scales of those scales (double quantization only), frozen
    layer.nf4.code, .code2, .offset   the lookup tables and offset: small buffers, replicated

`PlainNF4.state()` rebuilds the view of a bitsandbytes `QuantState` the dequantization kernels read, from
whatever tensors the module holds at call time: FSDP's gathered ones inside a forward or backward pass.
The values are the checkpoint's bytes, unchanged: dequantization gives exactly what bitsandbytes gives.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from loratune.kernels.nf4 import dequantize_nf4


@dataclass(frozen=True)
class PlainState:
    """The fields of a bitsandbytes `QuantState` that `loratune.kernels.nf4` reads."""

    shape: torch.Size
    code: Tensor
    absmax: Tensor
    blocksize: int
    dtype: torch.dtype
    quant_type: str
    offset: Tensor | None = None
    state2: PlainState | None = None

    @property
    def nested(self) -> bool:
        return self.state2 is not None


def _frozen(t: Tensor) -> nn.Parameter:
    return nn.Parameter(t.detach(), requires_grad=False)


class PlainNF4(nn.Module):
    """The quantization constants of one 4-bit weight as module tensors (see the module docstring)."""

    def __init__(self, qs) -> None:
        super().__init__()
        self.absmax = _frozen(qs.absmax)
        self.register_buffer("code", qs.code.detach().clone())
        self.nested = bool(qs.nested)
        if self.nested:
            self.absmax2 = _frozen(qs.state2.absmax)
            self.register_buffer("code2", qs.state2.code.detach().clone())
            self.register_buffer("offset", torch.as_tensor(qs.offset, dtype=torch.float32).detach().clone())
            self.blocksize2 = int(qs.state2.blocksize)
        self.shape, self.blocksize = torch.Size(qs.shape), int(qs.blocksize)
        self.dtype, self.quant_type = qs.dtype, str(qs.quant_type)

    def state(self) -> PlainState:
        inner = None
        if self.nested:
            inner = PlainState(torch.Size([self.absmax2.numel()]), self.code2, self.absmax2, self.blocksize2,
                               torch.float32, "dynamic")
        return PlainState(self.shape, self.code, self.absmax, self.blocksize, self.dtype, self.quant_type,
                          self.offset if self.nested else None, inner)

    def dequantize(self, packed: Tensor, dtype: torch.dtype) -> Tensor:
        """The [out, in] weight in `dtype` from the packed bytes `packed` and this module's constants."""
        return dequantize_nf4(packed, self.state(), dtype)

    def extra_repr(self) -> str:
        return f"{tuple(self.shape)}, {self.quant_type}, blocksize {self.blocksize}, nested {self.nested}"


def make_plain(layer: nn.Module) -> bool:
    """Turn a `QLoRALinear`'s bitsandbytes 4-bit weight into plain tensors (`layer.nf4`); False if it has none."""
    qs = getattr(layer.weight, "quant_state", None)
    if qs is None:
        return False
    packed = layer.weight.data  # the uint8 (or quant_storage) bytes as a plain tensor
    layer.nf4 = PlainNF4(qs)
    layer.weight = nn.Parameter(packed, requires_grad=False)
    return True
