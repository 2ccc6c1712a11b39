"""QLoRALinear: a frozen base weight, as bitsandbytes stores it or dense, plus an optional LoRA adapter.

The base weight is the checkpoint's own tensor, not a copy: a bitsandbytes `Params4bit` (NF4/FP4 packed
in uint8 with its `quant_state`) or a dense 16/32-bit tensor. The adapter follows peft's LoRA contract
(A [r, in] Kaiming-uniform, B [out, r] zeros, fp32; scale alpha/r, or alpha/sqrt(r) with rsLoRA; dropout
on the adapter's input only), so its weights are peft's weights (see `loratune.decoder.peft_io`).

The arithmetic is loratune's fused LoRA kernel (`loratune.kernels.lora_linear.lora_linear`): one autograd
node per layer, products in the compute dtype, the 4-bit base dequantized by `loratune.kernels.nf4`
(Triton on CUDA, plain PyTorch elsewhere) in the forward pass and again in the backward pass, never kept.
Layers that read the same input (q/k/v, gate/up) can run as one node (`project_group`, through
`loratune.kernels.lora_group`). A layer without an adapter runs `_FrozenLinear`, which likewise keeps no
dequantized weight for its backward pass.
"""

from __future__ import annotations

import contextlib
import math
import weakref
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from loratune.decoder.multi_lora import LayerAdapters
from loratune.errors import ModelError
from loratune.kernels.lora_group import LoRAGroup
from loratune.kernels.lora_linear import (
    UNCACHED,
    AdapterCasts,
    lora_linear,
    weight_fn_of,
)


class _FrozenLinear(torch.autograd.Function):
    """y = x W^T + b with W frozen; the backward pass rebuilds W (dequantizes again) for dx = g W."""

    @staticmethod
    def forward(ctx, x: Tensor, weight_fn: Callable[[torch.dtype], Tensor], bias: Tensor | None) -> Tensor:
        ctx.weight_fn = weight_fn
        return F.linear(x, weight_fn(x.dtype), None if bias is None else bias.to(x.dtype))

    @staticmethod
    def backward(ctx, g: Tensor):
        return g @ ctx.weight_fn(g.dtype), None, None


def lora_scale(rank: int, alpha: float, rslora: bool) -> float:
    """peft's scaling: alpha / r, or alpha / sqrt(r) with rank-stabilised LoRA."""
    return alpha / math.sqrt(rank) if rslora else alpha / rank


@dataclass(frozen=True)
class AdapterState:
    """One layer's LoRA adapter: A [r, in], B [out, r] and peft's scaling settings."""

    lora_A: nn.Parameter
    lora_B: nn.Parameter
    rank: int
    alpha: float
    rslora: bool
    dropout: float


class QLoRALinear(nn.Module):
    """y = x W^T + b (+ scale * B A dropout(x)); input cast to the compute dtype, output in it."""

    def __init__(self, weight: Tensor, bias: Tensor | None = None, compute_dtype: torch.dtype | None = None) -> None:
        super().__init__()
        qs = getattr(weight, "quant_state", None)
        if qs is None and weight.dim() != 2:
            raise ModelError(f"a linear weight must be 2-D or bitsandbytes 4-bit, got shape {tuple(weight.shape)}"
                             " (8-bit LLM.int8 bases train through the HF + peft path)")
        self.weight = weight if isinstance(weight, nn.Parameter) else nn.Parameter(weight, requires_grad=False)
        self.bias = None if bias is None else (bias if isinstance(bias, nn.Parameter)
                                               else nn.Parameter(bias, requires_grad=False))
        shape = tuple(qs.shape) if qs is not None else tuple(weight.shape)
        self.out_features, self.in_features = int(shape[0]), int(shape[1])
        self.compute_dtype = compute_dtype or (qs.dtype if qs is not None else weight.dtype)
        self.quantized = qs is not None
        self.lora_A: nn.Parameter | None = None
        self.lora_B: nn.Parameter | None = None
        self.rank, self.alpha, self.rslora, self.dropout = 0, 0.0, False, 0.0
        self.casts: AdapterCasts | None = None
        self.adapter_enabled = True  # False inside `adapters_disabled`: the base layer alone (a reference policy)
        self.ends_block = False  # the last layer before a residual add: its fused backward may be split
        self.kernels = True  # a 4-bit base dequantized by the Triton kernel on CUDA (False: the plain reference)
        # a 4-bit weight held as plain tensors (its constants here, not on the weight): shardable by FSDP
        self.nf4: nn.Module | None = None  # (`loratune.decoder.plain_nf4`)
        # adapters applied per row of a pass (several in one batch, `loratune.decoder.multi_lora`); None: unused
        self.mixed: LayerAdapters | None = None
        self._weight = (weakref.ref(self), weight_fn_of(self))

    def weight_fn(self, dtype: torch.dtype) -> Tensor:
        """The base weight in `dtype`: dequantized (4-bit; on CUDA one Triton kernel, its arguments kept while the
        packed weight stays put) or cast. Rebuilt for a copy of this layer (a deep copy shares no closure)."""
        if self.nf4 is not None:  # plain tensors (loratune.decoder.plain_nf4): read as they are at call time
            return self.nf4.dequantize(self.weight, dtype)
        owner, fn = self._weight
        if owner() is not self:
            fn = weight_fn_of(self)
            self._weight = (weakref.ref(self), fn)
        return fn(dtype)

    @property
    def scale(self) -> float:
        return lora_scale(self.rank, self.alpha, self.rslora) if self.rank else 0.0

    def add_adapter(self, rank: int, alpha: float, dropout: float = 0.0, rslora: bool = False,
                    casts: AdapterCasts | None = None, generator: torch.Generator | None = None) -> None:
        """A fresh LoRA adapter initialised as peft does: A Kaiming-uniform (a = sqrt 5), B zero, both fp32."""
        if rank < 1:
            raise ModelError(f"LoRA rank must be >= 1, got {rank}")
        device = self.weight.device
        a = torch.empty(rank, self.in_features, dtype=torch.float32, device=device)
        nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=generator)
        self.lora_A = nn.Parameter(a)
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, rank, dtype=torch.float32, device=device))
        self.rank, self.alpha, self.rslora, self.dropout = rank, float(alpha), rslora, float(dropout)
        self.casts = casts

    def remove_adapter(self) -> None:
        self.lora_A = self.lora_B = None
        self.rank, self.alpha, self.rslora, self.dropout = 0, 0.0, False, 0.0

    def adapter_state(self) -> AdapterState | None:
        """This layer's adapter as it is now (its weight tensors themselves, not copies); None without one."""
        if self.lora_A is None:
            return None
        return AdapterState(self.lora_A, self.lora_B, self.rank, self.alpha, self.rslora, self.dropout)

    def set_adapter_state(self, state: AdapterState | None, casts: AdapterCasts | None = None) -> None:
        """Put `state` on this layer (its tensors, not copies; None: no adapter). For switching between adapters
        kept aside (`loratune.infer.adapters`)."""
        if state is None:
            self.remove_adapter()
            return
        self.lora_A, self.lora_B = state.lora_A, state.lora_B
        self.rank, self.alpha, self.rslora, self.dropout = state.rank, state.alpha, state.rslora, state.dropout
        self.casts = casts

    def set_adapter_weights(self, lora_a: Tensor, lora_b: Tensor) -> None:
        """Copy A [r, in] and B [out, r] in (fp32), checking their shapes against this layer's adapter."""
        want_a, want_b = (self.rank, self.in_features), (self.out_features, self.rank)
        if tuple(lora_a.shape) != want_a or tuple(lora_b.shape) != want_b:
            raise ModelError(f"adapter weights of shapes {tuple(lora_a.shape)}, {tuple(lora_b.shape)} do not fit a "
                             f"rank-{self.rank} adapter on a {self.in_features} -> {self.out_features} layer "
                             f"(expected {want_a}, {want_b})")
        with torch.no_grad():
            self.lora_A.copy_(lora_a)
            self.lora_B.copy_(lora_b)

    def dropout_active(self) -> bool:
        return self.training and self.dropout > 0

    def forward(self, x: Tensor) -> Tensor:
        xc = x.to(self.compute_dtype)
        if self.lora_A is None or not self.adapter_enabled:
            if self.weight.requires_grad:  # a trained dense base (full fine-tuning): plain autograd
                return F.linear(xc, self.weight.to(xc.dtype), None if self.bias is None else self.bias.to(xc.dtype))
            y = _FrozenLinear.apply(xc, self.weight_fn, self.bias)
            if self.mixed is not None and self.mixed.active and self.adapter_enabled:
                return self.mixed.add_to(y, xc)  # each row's adapter on the shared base product (inference)
            return y
        x_lora = F.dropout(xc, p=self.dropout, training=True) if self.dropout_active() else None
        return lora_linear(xc, self.weight_fn, self.bias, self.lora_A, self.lora_B, self.scale, x_lora, self.casts,
                           split=self.ends_block)

    def extra_repr(self) -> str:
        kind = "4-bit" if self.quantized else str(self.weight.dtype).replace("torch.", "")
        lora = f", lora r={self.rank} alpha={self.alpha}" if self.rank else ""
        return f"{self.in_features} -> {self.out_features}, {kind}{lora}"


@dataclass(frozen=True)
class _GroupPlan:
    """What `kernels.lora_group.LoRAGroup` reads of each layer: its weight function, bias holder and scale."""

    weight_fn: Callable[[torch.dtype], Tensor]
    base: QLoRALinear
    scale: float


def project_group(layers: Sequence[QLoRALinear], x: Tensor) -> list[Tensor]:
    """`[layer(x) for layer in layers]`, as one autograd node when every layer has an adapter without active
    dropout and they share a compute dtype and adapter casts (one read of x for all rank-r projections)."""
    first = layers[0]
    if (len(layers) < 2 or any(m.lora_A is None or not m.adapter_enabled or m.dropout_active() for m in layers)
            or len({m.compute_dtype for m in layers}) != 1 or len({id(m.casts) for m in layers}) != 1):
        return [m(x) for m in layers]
    casts = first.casts or UNCACHED
    dt, shape = first.compute_dtype, x.shape
    xc = x.to(dt).reshape(-1, shape[-1])
    plans = tuple(_GroupPlan(m.weight_fn, m, m.scale) for m in layers)
    lora_as = [m.lora_A for m in layers]
    lora_bs = [m.lora_B for m in layers]
    a_cat = casts.get_cat(lora_as, dt)
    bs = [casts.get(m.lora_B, dt, m.scale) for m in layers]
    ys = LoRAGroup.apply(xc, a_cat, plans, *lora_as, *lora_bs, *bs)
    return [y.reshape(*shape[:-1], y.shape[-1]) for y in ys]


@contextlib.contextmanager
def adapters_disabled(module: nn.Module) -> Iterator[None]:
    """Every `QLoRALinear` under `module` computes its base layer alone while inside: the frozen base model, e.g.
    the reference policy of preference training, without a second copy of the weights. Re-entrant."""
    layers = [m for m in module.modules() if isinstance(m, QLoRALinear)]
    before = [m.adapter_enabled for m in layers]
    for m in layers:
        m.adapter_enabled = False
    try:
        yield
    finally:
        for m, b in zip(layers, before):
            m.adapter_enabled = b
