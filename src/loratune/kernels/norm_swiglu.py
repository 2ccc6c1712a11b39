"""RMSNorm and the SiLU-gated product as autograd functions with hand-written backward passes.

Why: around the matrix products of a Llama-style block, HF's RMSNorm makes ~7 passes over the
[tokens, hidden] activations (fp32 upcast, square, mean, rsqrt, scale, cast, weight) and the MLP's
`act_fn(gate) * up` two over [tokens, intermediate]; each pass is also a separate launch, and the
training step is bound by host time per launch. Here each is one kernel per direction
(`_norm_triton`, launched directly after the first call). liger-kernel has equivalent kernels; ours
exist because liger's Python wrappers cost more host time per call than the kernels' GPU time
(docs/benchmarks.md, "Figures behind the source's design notes").

The math (also the plain-PyTorch path used on CPU and by the tests as the reference):
    RMSNorm  r = 1/sqrt(mean(x^2) + eps),  y = w * dtype(x r);  dx = r (u - x r mean(u x r)), u = g w
    SwiGLU   y = a sigmoid(a) b;  da = g b s (1 + a (1 - s)),  db = g a s,  s = sigmoid(a)
The RMSNorm weight must be frozen (LoRA): no dw is computed; the caller checks it (loratune's decoder norms).
`triton=False` (model.kernels false) runs the plain-PyTorch path on CUDA too.
"""

from __future__ import annotations

import torch
from torch import Tensor


def _f(t: Tensor) -> Tensor:
    """At least fp32 (the kernels compute in fp32; fp64 stays fp64 for exact tests)."""
    return t if t.dtype in (torch.float32, torch.float64) else t.float()


def _rms_fwd_torch(x2: Tensor, w: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    xf = _f(x2)
    r = torch.rsqrt(xf.square().mean(-1) + eps)
    y = (_f((xf * r[:, None]).to(x2.dtype)) * _f(w)).to(x2.dtype)
    return y, r


def _rms_bwd_torch(g2: Tensor, x2: Tensor, w: Tensor, r: Tensor) -> Tensor:
    xh = _f(x2) * r[:, None]
    u = _f(g2) * _f(w)
    return (r[:, None] * (u - xh * (u * xh).mean(-1, keepdim=True))).to(x2.dtype)


def _swiglu_fwd_torch(a: Tensor, b: Tensor) -> Tensor:
    af = _f(a)
    return (af * torch.sigmoid(af) * _f(b)).to(a.dtype)


def _swiglu_bwd_torch(g: Tensor, a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    af, bf, gf = _f(a), _f(b), _f(g)
    s = torch.sigmoid(af)
    return (gf * bf * s * (1 + af * (1 - s))).to(a.dtype), (gf * af * s).to(b.dtype)


def _triton(t: Tensor, on: bool) -> bool:
    return on and t.is_cuda


class RMSNormFunction(torch.autograd.Function):
    """y = RMSNorm(x) with a frozen weight; one kernel forward, one backward (plain PyTorch off CUDA)."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, eps: float, triton: bool = True) -> Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        x2 = x2 if x2.is_contiguous() else x2.contiguous()
        if _triton(x2, triton):
            from loratune.kernels._norm_triton import rmsnorm_forward

            y, r = rmsnorm_forward(x2, weight, eps)
        else:
            y, r = _rms_fwd_torch(x2, weight, eps)
        ctx.save_for_backward(x2, weight, r)
        ctx.shape, ctx.triton = shape, triton
        return y.view(shape)

    @staticmethod
    def backward(ctx, g: Tensor):
        x2, w, r = ctx.saved_tensors
        g2 = g.reshape(x2.shape)
        g2 = g2 if g2.is_contiguous() else g2.contiguous()
        if _triton(x2, ctx.triton):
            from loratune.kernels._norm_triton import rmsnorm_backward

            dx = rmsnorm_backward(g2, x2, w, r)
        else:
            dx = _rms_bwd_torch(g2, x2, w, r)
        return dx.view(ctx.shape), None, None, None


class SwiGLUFunction(torch.autograd.Function):
    """y = silu(a) * b elementwise; one kernel forward, one backward (plain PyTorch off CUDA).

    With `reuse_inputs` (the caller's a and b feed nothing else) the CUDA backward writes da and db over a and b:
    in a Llama-3-8B block at 2 x 2048 tokens that is 224 MiB less at the moment of the step's memory peak (the
    first backward layer). The inputs' version counters are bumped, so a second backward through the same graph
    fails loudly instead of reading gradients as activations.
    """

    @staticmethod
    def forward(ctx, a: Tensor, b: Tensor, reuse_inputs: bool = False, triton: bool = True) -> Tensor:
        a = a if a.is_contiguous() else a.contiguous()
        b = b if b.is_contiguous() else b.contiguous()
        if _triton(a, triton):
            from loratune.kernels._norm_triton import swiglu_forward

            y = swiglu_forward(a, b)
        else:
            y = _swiglu_fwd_torch(a, b)
        ctx.save_for_backward(a, b)
        ctx.reuse = reuse_inputs and a.data_ptr() != b.data_ptr()
        ctx.triton = triton
        return y

    @staticmethod
    def backward(ctx, g: Tensor):
        a, b = ctx.saved_tensors
        g = g if g.is_contiguous() else g.contiguous()
        if _triton(a, ctx.triton):
            from loratune.kernels._norm_triton import swiglu_backward

            da, db = swiglu_backward(g, a, b, in_place=ctx.reuse)
            if ctx.reuse:
                torch.autograd.graph.increment_version(a)
                torch.autograd.graph.increment_version(b)
            return da, db, None, None
        return (*_swiglu_bwd_torch(g, a, b), None, None)


def rms_norm(x: Tensor, weight: Tensor, eps: float, triton: bool = True) -> Tensor:
    """RMSNorm with a frozen weight; `triton`: the Triton kernels on CUDA (False: the plain-PyTorch path)."""
    return RMSNormFunction.apply(x, weight, float(eps), triton)


def silu_mul(a: Tensor, b: Tensor, reuse_inputs: bool = False, triton: bool = True) -> Tensor:
    """silu(a) * b; `reuse_inputs`: a and b feed nothing else, so the backward may overwrite them (see
    SwiGLUFunction); `triton`: the Triton kernels on CUDA (False: the plain-PyTorch path)."""
    return SwiGLUFunction.apply(a, b, reuse_inputs, triton)
