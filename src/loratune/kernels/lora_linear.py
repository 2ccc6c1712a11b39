"""A LoRA linear layer as one (or two) autograd nodes: frozen (4-bit or 16-bit) base + low-rank update, in bf16.

Why: peft computes the adapter branch in fp32 (it casts the layer input to the adapter's fp32 dtype),
writes an fp32 [tokens, out] update, scales it in another pass, adds it to the base output in a third
and casts back: about 12 bytes per input value and 26 per output value moved for a product that is
tiny (rank 16). Here everything runs in the compute dtype and the update costs no pass of its own: the
rank-r product writes the output buffer first and the base product accumulates onto it inside the
matrix multiply (`addmm_` with beta = 1, whose read of the buffer hides under the multiply's
arithmetic). loratune's decoder (`loratune.decoder.lora.QLoRALinear`) runs every LoRA layer through it. The 4-bit base is dequantized by `loratune.kernels.nf4.dequantize_nf4` (one Triton kernel
on CUDA) in the forward pass and again in the backward pass; the bf16 copy is never kept.

The math (x_l = dropout(x) or x itself, W [out, in] frozen, A [r, in], B [out, r], s = scale), one
autograd node per layer, or for the last LoRA layer of a decoder block the same split in two:
    project:  xa = x_l A^T                          [T, r]      saves x_l (for dA)
    main:     y  = s xa B^T + b + x W^T             [T, out]    saves nothing (xa kept on ctx)
Backward, given g = dL/dy [T, out]:
    main:     gxa = s g B   [T, r];   dB = s g^T xa;   dx = gxa A + g W   (when x_l is x; else dx = g W)
    project:  dA = gxa^T x_l;   dx_l = gxa A   (only when x_l is a separate dropout output)
s is folded into B's compute-dtype cast once per window (`AdapterCasts.get(B, dtype, s)`), so neither the
forward product nor gxa pays a separate scaling pass.
Why split the last layer: under non-reentrant activation checkpointing the recompute stops as soon as the last
tensor saved by the block has been recomputed. `main` saves nothing (its rank-r `xa` is kept on ctx:
tokens x r values, ~128 KB per layer at 4096 tokens x r 16), so in a decoder block whose last linear
layer is LoRA (Llama's down_proj) the recompute ends after that layer's cheap projection and skips its
dequantization and its large matrix product: about 8% of a Llama step's matrix work.
W and b are frozen: no gradient. A and B stay fp32 parameters (optimizer precision); they are cast to
the compute dtype for the products, and their gradients are returned in fp32.
`reference_lora_linear` is the plain autograd version to test against.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor


def reference_lora_linear(x: Tensor, weight: Tensor, bias: Tensor | None, lora_a: Tensor, lora_b: Tensor,
                          scale: float, x_lora: Tensor | None = None) -> Tensor:
    """Plain PyTorch: F.linear(x, W, b) + s * B(A(x_l)), all in x's dtype."""
    x_l = x if x_lora is None else x_lora
    dt = x.dtype
    return F.linear(x, weight.to(dt), None if bias is None else bias.to(dt)) + \
        scale * F.linear(F.linear(x_l, lora_a.to(dt)), lora_b.to(dt))


def _update_then_base(x: Tensor, xa: Tensor, weight_fn: Callable[[torch.dtype], Tensor], bias: Tensor | None,
                      b_s: Tensor) -> Tensor:
    """y = xa (s B)^T (+ bias), then x W^T accumulated onto it in the matrix product (beta = 1). `b_s` is the
    compute-dtype cast of B with the scale s folded in (`AdapterCasts.get(lora_b, dtype, s)`)."""
    y = xa @ b_s.t() if bias is None else torch.addmm(bias.to(x.dtype), xa, b_s.t())
    y.addmm_(x, weight_fn(x.dtype).t())
    return y


_MM_OUT_DTYPE: bool | None = None  # whether torch.mm(..., out_dtype=) works here (CUDA builds of recent torch)


def _mm_to(a: Tensor, b: Tensor, dtype: torch.dtype) -> Tensor:
    """a @ b returned in `dtype`: on CUDA, a 16-bit product written in fp32 by the matrix multiply itself
    (fp32 accumulation, no rounding to 16 bits, no separate cast kernel); elsewhere the product, then a cast."""
    global _MM_OUT_DTYPE
    if a.is_cuda and dtype == torch.float32 and a.dtype in (torch.bfloat16, torch.float16) and _MM_OUT_DTYPE is not False:
        try:
            out = torch.mm(a, b, out_dtype=torch.float32)
            _MM_OUT_DTYPE = True
            return out
        except (TypeError, RuntimeError):
            if _MM_OUT_DTYPE:  # it worked before: this is a real error
                raise
            _MM_OUT_DTYPE = False
    return (a @ b).to(dtype)


def _input_grad(g: Tensor, gxa: Tensor, a: Tensor | None, weight_fn: Callable[[torch.dtype], Tensor]) -> Tensor:
    """dx = g W, plus gxa A when x also fed the projection (`a` given): that share first, g W accumulated onto it."""
    if a is None:
        return g @ weight_fn(g.dtype)
    dx = gxa @ a
    dx.addmm_(g, weight_fn(g.dtype))
    return dx


class _LoRALinear(torch.autograd.Function):
    """The whole layer as one node (the math of the module docstring): saves x (x_l) and xa."""

    @staticmethod
    def forward(ctx, x: Tensor, x_l: Tensor | None, weight_fn: Callable[[torch.dtype], Tensor], bias: Tensor | None,
                lora_a: Tensor, lora_b: Tensor, a: Tensor, b: Tensor, scale: float) -> Tensor:
        xa = (x if x_l is None else x_l) @ a.t()
        y = _update_then_base(x, xa, weight_fn, bias, b)
        ctx.save_for_backward(x if x_l is None else x_l, xa)
        ctx.weight_fn, ctx.scale, ctx.a, ctx.b, ctx.separate = weight_fn, scale, a, b, x_l is not None
        ctx.dtypes = (lora_a.dtype, lora_b.dtype)
        return y

    @staticmethod
    def backward(ctx, g: Tensor):
        x_l, xa = ctx.saved_tensors
        s, a, b = ctx.scale, ctx.a, ctx.b
        g = g.to(b.dtype)
        need_x, need_xl, _, _, need_a, need_b = ctx.needs_input_grad[:6]
        gxa = g @ b  # b carries s
        d_b = _mm_to(g.t(), xa, ctx.dtypes[1]).mul_(s) if need_b else None
        d_a = _mm_to(gxa.t(), x_l, ctx.dtypes[0]) if need_a else None
        dx = _input_grad(g, gxa, None if ctx.separate else a, ctx.weight_fn) if need_x else None
        dxl = gxa @ a if (ctx.separate and need_xl) else None
        return dx, dxl, None, None, d_a, d_b, None, None, None


class _LoRAProject(torch.autograd.Function):
    """xa = x_l A^T; backward gives dA and, when x_l is not also the main input, dx_l."""

    @staticmethod
    def forward(ctx, x_l: Tensor, lora_a: Tensor, a: Tensor, grad_to_input: bool) -> Tensor:
        ctx.save_for_backward(x_l)
        ctx.a, ctx.a_dtype, ctx.grad_to_input = a, lora_a.dtype, grad_to_input
        return x_l @ a.t()

    @staticmethod
    def backward(ctx, gxa: Tensor):
        (x_l,) = ctx.saved_tensors
        need_x, need_a = ctx.needs_input_grad[:2]
        d_a = _mm_to(gxa.t(), x_l, ctx.a_dtype) if need_a else None
        dx_l = gxa @ ctx.a if (need_x and ctx.grad_to_input) else None
        return dx_l, d_a, None, None


class _LoRAMain(torch.autograd.Function):
    """y = s xa B^T + b + x W^T; saves no tensor (see the module docstring)."""

    @staticmethod
    def forward(ctx, x: Tensor, xa: Tensor, weight_fn: Callable[[torch.dtype], Tensor], bias: Tensor | None,
                lora_b: Tensor, b: Tensor, a: Tensor | None, scale: float) -> Tensor:
        y = _update_then_base(x, xa, weight_fn, bias, b)
        ctx.xa = xa.detach()
        ctx.weight_fn, ctx.scale, ctx.b, ctx.a, ctx.b_dtype = weight_fn, scale, b, a, lora_b.dtype
        return y

    @staticmethod
    def backward(ctx, g: Tensor):
        s, dt = ctx.scale, ctx.b.dtype
        g = g.to(dt)
        need_x, need_xa, _, _, need_b = ctx.needs_input_grad[:5]
        gxa = g @ ctx.b  # ctx.b carries s
        d_b = _mm_to(g.t(), ctx.xa, ctx.b_dtype).mul_(s) if need_b else None
        dx = _input_grad(g, gxa, ctx.a, ctx.weight_fn) if need_x else None  # ctx.a: x also fed the projection
        return dx, gxa if need_xa else None, None, None, d_b, None, None, None


class AdapterCasts:
    """Compute-dtype copies of adapter weights, shared by all passes inside `frozen()`, else made per call.

    Inside `frozen()` the caller promises that no adapter weight changes (no optimizer step, no load);
    the copies are dropped when it exits. Outside it every `get` casts afresh, so a change made at any
    time (an optimizer step, loading a checkpoint, a test editing weights) is always seen.
    """

    def __init__(self) -> None:
        self.active = False
        self.copies: dict[tuple[int, torch.dtype, float], Tensor] = {}
        self.params: list[Tensor] = []  # every adapter weight of the model (see `track`)
        self.scales: dict[int, float] = {}  # id(weight) -> the scale its cast carries (B matrices)
        self.batched: set[torch.dtype] = set()  # dtypes cast for all `params` in this window
        self.stacked: dict[tuple, Tensor] = {}  # get_cat's copies in this window

    def track(self, params: list[Tensor], scales: dict[int, float] | None = None) -> None:
        """The adapter weights of the whole model: inside `frozen()` the first request for a dtype casts them all
        with a few multi-tensor kernels (`torch._foreach_copy_`, then `_foreach_mul_` for the B matrices' scales,
        `scales`: id(weight) -> s) instead of one or two kernels per weight (448 weights for a Llama-3-8B with
        7 targets: as many launches per step)."""
        self.params, self.scales = list(params), dict(scales or {})

    def get(self, p: Tensor, dtype: torch.dtype, scale: float = 1.0) -> Tensor:
        """`p` cast to `dtype` and multiplied by `scale` (the LoRA scale folded into B once, not applied to
        every product); a new tensor, never `p` itself when `scale` is not 1."""
        if not self.active:
            c = p.detach().to(dtype)
            return c * scale if scale != 1.0 else c
        key = (id(p), dtype, scale)
        c = self.copies.get(key)
        if c is None and self.params and dtype not in self.batched:
            self._cast_all(dtype)
            c = self.copies.get(key)
        if c is None:
            c = p.detach().to(dtype)
            c = self.copies[key] = c * scale if scale != 1.0 else c
        return c

    def get_cat(self, params: list[Tensor], dtype: torch.dtype) -> Tensor:
        """The casts of `params` stacked along dim 0 (the A matrices of layers sharing an input), made once per
        window inside `frozen()`."""
        if not self.active:
            return torch.cat([self.get(p, dtype) for p in params])
        key = (tuple(id(p) for p in params), dtype)
        c = self.stacked.get(key)
        if c is None:
            c = self.stacked[key] = torch.cat([self.get(p, dtype) for p in params])
        return c

    def _cast_all(self, dtype: torch.dtype) -> None:
        self.batched.add(dtype)
        groups: dict[torch.device, tuple[list[Tensor], list[Tensor], list[Tensor], list[float]]] = {}
        for q in self.params:
            scale = self.scales.get(id(q), 1.0)
            key = (id(q), dtype, scale)
            if key in self.copies or (q.dtype == dtype and scale == 1.0):
                continue
            d = self.copies[key] = torch.empty(q.shape, dtype=dtype, device=q.device)
            dsts, srcs, scaled, factors = groups.setdefault(q.device, ([], [], [], []))
            dsts.append(d)
            srcs.append(q.detach())
            if scale != 1.0:
                scaled.append(d)
                factors.append(scale)
        for dsts, srcs, scaled, factors in groups.values():
            torch._foreach_copy_(dsts, srcs)
            if scaled:
                torch._foreach_mul_(scaled, factors)

    @contextlib.contextmanager
    def frozen(self) -> Iterator[None]:
        """A window with its own copies; nested windows (a CUDA graph capture) start fresh and restore the outer."""
        outer = self.active, self.copies, self.batched, self.stacked
        self.active, self.copies, self.batched, self.stacked = True, {}, set(), {}
        try:
            yield
        finally:
            self.active, self.copies, self.batched, self.stacked = outer


UNCACHED = AdapterCasts()


def lora_linear(x: Tensor, weight_fn: Callable[[torch.dtype], Tensor], bias: Tensor | None, lora_a: Tensor,
                lora_b: Tensor, scale: float, x_lora: Tensor | None = None, casts: AdapterCasts | None = None,
                split: bool = False) -> Tensor:
    """y = x W^T + b + scale * (x_lora A^T) B^T (x_lora defaults to x): one autograd node, or with `split`
    the projection and main nodes above (for a block's last layer: its recompute is then skipped).
    One node is cheaper on the host (each autograd node costs Python time in every pass).

    The adapter weights are cast to x's dtype by `casts` (an `AdapterCasts`): once per call, or, inside
    `AdapterCasts.frozen()`, once per window in which the optimizer does not step (the training loop's
    forward and backward passes of one optimizer step), the copies then serving the forward, the
    recompute and the backward pass of every micro-batch. (A cache across optimizer steps keyed on the
    parameters' version counters was tried and removed: the fused CUDA AdamW updates parameters without
    bumping their versions, so it served stale weights; tests/gpu keeps a check.)
    """
    dt, shape = x.dtype, x.shape
    casts = casts or UNCACHED
    a, b = casts.get(lora_a, dt), casts.get(lora_b, dt, float(scale))  # b: s B, the scale folded in once
    x2 = x.reshape(-1, shape[-1])
    xl2 = x2 if x_lora is None else x_lora.reshape(-1, shape[-1])
    if not split:
        y = _LoRALinear.apply(x2, None if x_lora is None else xl2, weight_fn, bias, lora_a, lora_b, a, b, float(scale))
        return y.reshape(*shape[:-1], y.shape[-1])
    xa = _LoRAProject.apply(xl2, lora_a, a, x_lora is not None)
    y = _LoRAMain.apply(x2, xa, weight_fn, bias, lora_b, b, a if x_lora is None else None, float(scale))
    return y.reshape(*shape[:-1], y.shape[-1])


# ------------------------------------------------------------------------------------ the frozen base weight


def weight_fn_of(base: torch.nn.Module) -> Callable[[torch.dtype], Tensor]:
    """The frozen weight of a layer that holds a bitsandbytes 4-bit weight (dequantized on demand) or a dense one
    (loratune's `QLoRALinear`).

    For a 4-bit weight on CUDA the kernel's arguments are built once and reused while the packed
    weight stays the same tensor; nothing in a call waits for the GPU. A layer whose `kernels` is False
    (model.kernels false, `loratune.decoder.Decoder.use_kernels`) is dequantized by the plain-PyTorch reference.
    """
    from loratune.kernels.nf4 import dequantize_nf4, triton_available

    cache: dict = {}

    def weight(dtype: torch.dtype) -> Tensor:
        w = base.weight
        qs = getattr(w, "quant_state", None)
        if qs is None:
            return w.to(dtype)
        if not (w.is_cuda and getattr(base, "kernels", True) and triton_available()):
            return dequantize_nf4(w.data, qs, dtype, triton=False)
        from loratune.kernels._nf4_triton import dequantize_nf4_triton, kernel_args

        key = (w.data.data_ptr(), id(qs))
        if cache.get("key") != key:
            cache.update(key=key, args=kernel_args(w.data, qs))
        return dequantize_nf4_triton(w.data, qs, dtype, args=cache["args"])

    return weight
