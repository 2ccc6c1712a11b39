"""RMSNorm in its two forms: Llama's `w * dtype(x_hat)` and Gemma's `dtype(x_hat * (1 + w))`.

Why two: they round differently in 16-bit (Llama rounds the normalised x before the weight, Gemma after)
and Gemma stores w - 1. A frozen Llama-form norm runs through `loratune.kernels.norm_swiglu.rms_norm`
(one Triton kernel per direction on CUDA, its plain PyTorch path elsewhere); a trainable one (full
fine-tuning) and the Gemma form are plain PyTorch with autograd, with statistics in fp32 as transformers
computes them. `kernels` False (model.kernels false, `Decoder.use_kernels`): the plain PyTorch path on CUDA too.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from loratune.kernels.norm_swiglu import rms_norm


class RMSNorm(nn.Module):
    """Normalise the last dim of x; `unit_offset` is Gemma's (1 + w) form."""

    def __init__(self, weight: Tensor, eps: float, unit_offset: bool = False) -> None:
        super().__init__()
        self.weight = weight if isinstance(weight, nn.Parameter) else nn.Parameter(weight, requires_grad=False)
        self.eps, self.unit_offset = float(eps), unit_offset
        self.kernels = True  # the Triton kernel on CUDA (False: its plain-PyTorch path)

    def forward(self, x: Tensor) -> Tensor:
        if self.unit_offset:
            xf = x.float()
            y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
            return (y * (1.0 + self.weight.float())).type_as(x)
        if self.weight.requires_grad:  # the kernel computes no weight gradient
            xf = x.float()
            y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
            return self.weight * y.to(x.dtype)
        return rms_norm(x, self.weight, self.eps, triton=self.kernels)

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.eps}, unit_offset={self.unit_offset}"
