"""LoRA layers that share one input (q/k/v, gate/up) as one autograd node.

Why: q, k and v all read the same normed hidden states, as do gate and up. Run as separate fused layers
(`lora_linear`), each one reads that [tokens, hidden] input again for its rank-r projection, in the
forward pass, in the recompute and in the backward pass (for dA). Each layer also returns its own
input gradient, and autograd then adds those: two [tokens, hidden] additions for q/k/v and one for
gate/up, per layer and backward pass. As one node:
    forward:   xa = x [A_1; ...; A_n]^T                       one read of x for every rank-r projection
               y_i = xa_i (s_i B_i)^T + b_i + x W_i^T         (update first, base accumulated onto it;
                                                               s_i folded into the cast of B_i)
    backward:  gxa_i = g_i (s_i B_i);  dB_i = s_i g_i^T xa_i
               [dA_1; ...; dA_n] = [gxa_1 ... gxa_n]^T x      one read of x for every dA
               dx = [gxa_1 ... gxa_n] [A_1; ...; A_n] + sum_i g_i W_i    accumulated in one buffer (beta = 1)
The caller (`loratune.decoder.lora.project_group`) takes this path only when every layer has an active adapter
with no adapter dropout (a dropout mask per layer means a separate input per layer); otherwise each layer runs
its own forward. The plain reference is the layers run one by one (tests compare the two).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import torch
from torch import Tensor

from loratune.kernels.lora_linear import _mm_to, _update_then_base


class GroupMember(Protocol):
    """What the node reads of each layer: its frozen weight (`weight_fn(dtype)`), `base.bias` and LoRA scale."""

    weight_fn: Callable[[torch.dtype], Tensor]
    base: Any
    scale: float


class LoRAGroup(torch.autograd.Function):
    """Outputs y_1..y_n of n LoRA layers on one input (module docstring). Saves x and xa."""

    @staticmethod
    def forward(ctx, x: Tensor, a_cat: Tensor, plans: tuple[GroupMember, ...], *tensors: Tensor) -> tuple[Tensor, ...]:
        n = len(plans)
        lora_as, lora_bs, bs = tensors[:n], tensors[n:2 * n], tensors[2 * n:]
        xa = x @ a_cat.t()
        ys, off = [], 0
        for plan, a, b in zip(plans, lora_as, bs):
            r = a.shape[0]
            ys.append(_update_then_base(x, xa[:, off:off + r], plan.weight_fn, plan.base.bias, b))
            off += r
        ctx.save_for_backward(x, xa)
        ctx.plans, ctx.a_cat, ctx.bs = plans, a_cat, bs
        ctx.ranks = [a.shape[0] for a in lora_as]
        ctx.dtypes = ([a.dtype for a in lora_as], [b.dtype for b in lora_bs])
        return tuple(ys)

    @staticmethod
    def backward(ctx, *gs: Tensor):
        x, xa = ctx.saved_tensors
        n = len(ctx.plans)
        need = ctx.needs_input_grad
        need_x, need_as, need_bs = need[0], need[3:3 + n], need[3 + n:3 + 2 * n]
        gxas, d_bs, live, off = [], [], [], 0
        for plan, b, g, r, b_dtype, need_b in zip(ctx.plans, ctx.bs, gs, ctx.ranks, ctx.dtypes[1], need_bs):
            if g is None:  # an output that took no part in the loss
                gxas.append(torch.zeros(x.shape[0], r, dtype=x.dtype, device=x.device))
                d_bs.append(None)
            else:
                g = g.to(b.dtype)
                gxas.append(g @ b)  # b carries the scale
                d_bs.append(_mm_to(g.t(), xa[:, off:off + r], b_dtype).mul_(plan.scale) if need_b else None)
                live.append((plan, g))
            off += r
        gxa = torch.cat(gxas, dim=1)
        d_as: list[Tensor | None] = [None] * n
        if any(need_as):
            d_a = _mm_to(gxa.t(), x, ctx.dtypes[0][0])
            d_as = [d if need_a else None for d, need_a in zip(d_a.split(ctx.ranks, dim=0), need_as)]
        dx = None
        if need_x:
            dx = gxa @ ctx.a_cat
            for plan, g in live:
                dx.addmm_(g, plan.weight_fn(g.dtype))
        return (dx, None, None, *d_as, *d_bs, *([None] * n))

