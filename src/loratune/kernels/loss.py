"""Linear + cross-entropy without the full logits: the loss of a causal LM, summed over supervised tokens.

Why: a 128k vocabulary makes the logits of a 2 x 2048 batch 1 GB in bf16 and 2 GB in fp32, and the
usual path holds several such tensors at once (logits, their fp32 copy, softmax, its gradient). Here
the rows are processed in chunks: each chunk's logits live only inside the forward pass, which also
computes their gradient right away (cross-entropy is the last op, so its backward needs nothing from
later), and keeps only d(hidden) (the size of the hidden states) and, when the head is trained,
d(weight). The backward pass then just scales those by the incoming gradient.

`fused_linear_cross_entropy_sum` returns `(loss_sum, n_tokens)`: a sum, not a mean, because the training loop normalises
by the number of supervised tokens across all micro-batches of an accumulation step.

Math, per row i with logits l = h_i W^T (computed in the input dtype, as `lm_head` does, then fp32),
optional softcap c (z = c tanh(l / c), else z = l), label y_i:
    loss_i   = logsumexp(z) - z[y_i]                          (0 when y_i == ignore_index)
    dz       = softmax(z) - onehot(y_i)                       (0 rows when ignored)
    dl       = dz * (1 - (z / c)^2)                            (softcap only; d tanh = 1 - tanh^2)
    dh_i     = dl W            dW += dl^T h_i
and backward(g) returns g * dh, g * dW (g is the scalar gradient of loss_sum).
`reference_linear_cross_entropy_sum` is the plain version (full logits, autograd) to test against.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

# Elements of one chunk's logits (rows x vocab): 2^25 is 128 MB in fp32 (261 rows of a 128k vocabulary,
# still enough for an efficient matrix product). Three chunks' worth is live at once, and at the end of
# the forward pass that was the peak of a Llama-3-8B QLoRA step at 2 x 2048 with 2^26 (0.87 GiB against
# 0.79 GiB for a layer's recompute and backward; loratune.model.memory); 2^25 takes that moment below it.
CHUNK_ELEMENTS = 1 << 25


def reference_linear_cross_entropy_sum(hidden: Tensor, weight: Tensor, labels: Tensor, ignore_index: int = -100,
                                       softcap: float | None = None) -> tuple[Tensor, Tensor]:
    """Plain PyTorch: full logits, fp32 cross-entropy, autograd. hidden [N, H], weight [V, H], labels [N]."""
    logits = _at_least_fp32(hidden @ weight.t())
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    loss = F.cross_entropy(logits, labels, ignore_index=ignore_index, reduction="sum")
    return loss, (labels != ignore_index).sum()


def _at_least_fp32(x: Tensor) -> Tensor:
    """Cross-entropy over a large vocabulary needs fp32: bf16 logits lose the small probabilities."""
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def _triton_rows_available(hidden: Tensor, weight: Tensor) -> bool:
    """Whether the chunks go through `_ce_triton` (CUDA, 16-bit logits, Triton importable)."""
    from loratune.kernels.nf4 import triton_available

    return (hidden.is_cuda and hidden.dtype in (torch.bfloat16, torch.float16) and weight.dtype == hidden.dtype
            and triton_available())


def _chunk_rows(n_rows: int, vocab: int, chunk_elements: int) -> int:
    return max(1, min(n_rows, chunk_elements // max(vocab, 1)))


class _ChunkedLinearCE(torch.autograd.Function):
    """Forward computes the loss sum and the gradients chunk by chunk; backward scales them."""

    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, labels: Tensor, ignore_index: int,
                softcap: float | None, chunk_elements: int, triton: bool = True) -> Tensor:
        need_h = ctx.needs_input_grad[0]
        need_w = ctx.needs_input_grad[1]
        n, vocab = hidden.shape[0], weight.shape[0]
        acc = torch.float64 if hidden.dtype == torch.float64 else torch.float32
        loss = torch.zeros((), dtype=acc, device=hidden.device)
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_w else None
        rows = _chunk_rows(n, vocab, chunk_elements)
        fused = triton and _triton_rows_available(hidden, weight) and not need_w
        for start in range(0, n, rows):
            h = hidden[start:start + rows]
            y = labels[start:start + rows]
            if fused:  # CUDA, 16-bit: one Triton pass per row turns the 16-bit logits into their gradient in place
                from loratune.kernels._ce_triton import ce_rows_inplace

                z = h @ weight.t()
                loss += ce_rows_inplace(z, y, ignore_index, softcap, write_grad=need_h).sum()
                if need_h:
                    grad_h[start:start + rows] = z @ weight
                continue
            z = _at_least_fp32(h @ weight.t())  # logits in the input dtype, as lm_head gives them, then fp32
            if softcap is not None:
                z = torch.tanh_(z.div_(softcap)).mul_(softcap)
            valid = y != ignore_index
            y_safe = torch.where(valid, y, torch.zeros_like(y)).unsqueeze(1)
            lse = torch.logsumexp(z, dim=-1, keepdim=True)
            target = z.gather(1, y_safe)
            loss += ((lse - target).squeeze(1) * valid).sum()
            if not (need_h or need_w):
                continue
            tanh = z / softcap if softcap is not None else None  # before z turns into dz in place
            dz = z.sub_(lse).exp_()  # softmax, in place
            dz.scatter_add_(1, y_safe, torch.full_like(target, -1.0))
            dz.mul_(valid.unsqueeze(1))
            if tanh is not None:
                dz.mul_(1.0 - tanh * tanh)
            if need_h:
                grad_h[start:start + rows] = dz.to(hidden.dtype) @ weight
            if need_w:  # a trained head (rare with LoRA): accumulate in fp32 from the fp32 dz
                grad_w.addmm_(dz.t(), h.to(acc))
        ctx.save_for_backward(grad_h, grad_w)
        ctx.weight_dtype = weight.dtype
        return loss

    @staticmethod
    def backward(ctx, g: Tensor):
        grad_h, grad_w = ctx.saved_tensors
        dh = grad_h * g.to(grad_h.dtype) if grad_h is not None else None
        dw = (grad_w * g).to(ctx.weight_dtype) if grad_w is not None else None
        return dh, dw, None, None, None, None, None


def fused_linear_cross_entropy_sum(hidden: Tensor, lm_head_weight: Tensor, labels: Tensor, ignore_index: int = -100,
                                   softcap: float | None = None, chunk_elements: int = CHUNK_ELEMENTS,
                                   impl: str = "chunked", triton: bool = True) -> tuple[Tensor, Tensor]:
    """Sum of token cross-entropies of `hidden @ lm_head_weight.T` against `labels`, never holding all logits.

    hidden [N, H] (or [B, S, H]), lm_head_weight [V, H], labels [N] (or [B, S]) already aligned with
    hidden (shifted for next-token prediction by the caller). Returns (fp32 loss_sum, n_tokens).
    `impl="chunked"` (this module, any device): peak extra memory is one chunk of `chunk_elements`
    fp32 logits and a copy; on CUDA with 16-bit weights and a frozen head, one chunk of 16-bit logits that a
    Triton kernel turns into their gradient in place (`_ce_triton`). `impl="liger"`: liger-kernel's fused
    linear cross-entropy (CUDA, Triton softmax kernels), for comparison in benchmarks/bench_train.py.
    `triton=False` (model.kernels false): the chunked path without `_ce_triton`.
    """
    hidden = hidden.reshape(-1, hidden.shape[-1])
    labels = labels.reshape(-1)
    if hidden.shape[0] != labels.shape[0]:
        raise ValueError(f"hidden has {hidden.shape[0]} rows but labels has {labels.shape[0]}")
    if impl == "liger":
        from liger_kernel.ops.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyFunction

        loss = LigerFusedLinearCrossEntropyFunction.apply(hidden, lm_head_weight, labels, None, None, ignore_index,
                                                          0.0, 0.0, "sum", softcap)[0]
    else:
        loss = _ChunkedLinearCE.apply(hidden, lm_head_weight, labels, ignore_index, softcap, chunk_elements, triton)
    return loss, (labels != ignore_index).sum()
