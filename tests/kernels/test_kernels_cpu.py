"""CPU checks of the kernels' plain paths: chunked loss, NF4 reference dequantization, LoRA autograd function.

The Triton kernels themselves are compared with these references in tests/gpu (CUDA only).
"""

from __future__ import annotations


import bitsandbytes.functional as bnbf
import pytest
import torch
import torch.nn.functional as F

from loratune.kernels.lora_linear import lora_linear, reference_lora_linear
from loratune.kernels.loss import fused_linear_cross_entropy_sum, reference_linear_cross_entropy_sum
from loratune.kernels.nf4 import dequantize_nf4, reference_dequantize_nf4


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


# ------------------------------------------------------------------------------------------- loss


@pytest.mark.parametrize("softcap", [None, 20.0])
@pytest.mark.parametrize("chunk_elements", [97 * 5, 1 << 26])
def test_fused_ce_matches_reference_fp64(softcap: float | None, chunk_elements: int) -> None:
    g = torch.Generator().manual_seed(0)
    h = torch.randn(53, 24, generator=g, dtype=torch.float64, requires_grad=True)
    w = (3 * torch.randn(97, 24, generator=g, dtype=torch.float64)).requires_grad_(True)
    y = torch.randint(0, 97, (53,), generator=g)
    y[::4] = -100
    got, n_got = fused_linear_cross_entropy_sum(h, w, y, softcap=softcap, chunk_elements=chunk_elements)
    want, n_want = reference_linear_cross_entropy_sum(h, w, y, softcap=softcap)
    assert int(n_got) == int(n_want) == 53 - 14
    assert torch.allclose(got.double(), want, rtol=1e-6)  # the loss sum is accumulated in fp32
    gh, gw = torch.autograd.grad(2.5 * got, (h, w))
    eh, ew = torch.autograd.grad(2.5 * want, (h, w))
    assert _rel(gh, eh) < 1e-6 and _rel(gw, ew) < 1e-6


def test_fused_ce_bf16_close_and_frozen_head() -> None:
    g = torch.Generator().manual_seed(1)
    h = torch.randn(2, 40, 32, generator=g).to(torch.bfloat16).requires_grad_(True)
    w = torch.randn(300, 32, generator=g).to(torch.bfloat16)  # frozen head: no weight gradient
    y = torch.randint(0, 300, (2, 40), generator=g)
    got, _ = fused_linear_cross_entropy_sum(h, w, y, chunk_elements=300 * 16)
    want, _ = reference_linear_cross_entropy_sum(h.reshape(-1, 32), w, y.reshape(-1))
    assert _rel(got, want) < 1e-5
    (gh,) = torch.autograd.grad(got, (h,))
    (eh,) = torch.autograd.grad(want, (h,))
    assert gh.shape == h.shape and _rel(gh, eh.reshape(h.shape)) < 1e-2


def test_fused_ce_all_ignored_and_no_grad() -> None:
    h = torch.randn(5, 8, requires_grad=True)
    w = torch.randn(11, 8)
    y = torch.full((5,), -100)
    loss, n = fused_linear_cross_entropy_sum(h, w, y)
    assert float(loss) == 0.0 and int(n) == 0
    loss.backward()
    assert torch.count_nonzero(h.grad) == 0
    with torch.no_grad():
        loss, _ = fused_linear_cross_entropy_sum(h, w, torch.randint(0, 11, (5,)))
    assert loss > 0


# -------------------------------------------------------------------------------------------- nf4


@pytest.mark.parametrize("shape", [(64, 128), (33, 66), (7, 9)])
@pytest.mark.parametrize("nested", [True, False])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_reference_dequant_matches_bitsandbytes(shape: tuple[int, int], nested: bool, quant_type: str) -> None:
    w = torch.randn(*shape, generator=torch.Generator().manual_seed(3)).to(torch.bfloat16)
    packed, qs = bnbf.quantize_4bit(w, blocksize=64, compress_statistics=nested, quant_type=quant_type,
                                    quant_storage=torch.uint8)
    want = bnbf.dequantize_4bit(packed, qs)
    got = reference_dequantize_nf4(packed, qs)
    assert got.dtype == want.dtype and torch.equal(got, want)
    assert torch.equal(dequantize_nf4(packed, qs), want)  # CPU: the reference path


def test_reference_dequant_is_within_quantization_error() -> None:
    """(64, 96): bitsandbytes 0.50.2's own CPU dequantization disagrees here (error 2.6x larger than ours,
    seen 2026-11-22); its CUDA kernel is compared with ours in tests/gpu."""
    w = torch.randn(64, 96, generator=torch.Generator().manual_seed(3))
    packed, qs = bnbf.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4",
                                    quant_storage=torch.uint8)
    assert _rel(reference_dequantize_nf4(packed, qs), w) < 0.12  # NF4 with 64-blocks: about 0.09


# -------------------------------------------------------------------------------------- lora linear


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("dropout", [False, True])
@pytest.mark.parametrize("split", [False, True])
def test_lora_linear_matches_reference_fp64(bias: bool, dropout: bool, split: bool) -> None:
    g = torch.Generator().manual_seed(4)
    t, d_in, d_out, r = 19, 48, 40, 4
    x = torch.randn(2, t, d_in, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(d_out, d_in, generator=g, dtype=torch.float64)
    b = torch.randn(d_out, generator=g, dtype=torch.float64) if bias else None
    a = torch.randn(r, d_in, generator=g, dtype=torch.float64, requires_grad=True)
    bb = torch.randn(d_out, r, generator=g, dtype=torch.float64, requires_grad=True)
    mask = (torch.rand(x.shape, generator=g) > 0.3).double() / 0.7 if dropout else None
    upstream = torch.randn(2, t, d_out, generator=g, dtype=torch.float64)

    def run(fused: bool):
        x_l = x * mask if dropout else None
        y = lora_linear(x, lambda dt: w.to(dt), b, a, bb, 0.7, x_l, split=split) if fused else \
            reference_lora_linear(x, w, b, a, bb, 0.7, x_l)
        return (y, *torch.autograd.grad(y, (x, a, bb), upstream))

    for got, want in zip(run(True), run(False)):
        assert _rel(got, want) < 1e-12


def test_reference_lora_linear_is_plain_math() -> None:
    x, w, a, b = torch.randn(3, 8), torch.randn(5, 8), torch.randn(2, 8), torch.randn(5, 2)
    assert torch.allclose(reference_lora_linear(x, w, None, a, b, 2.0), x @ w.T + 2.0 * (x @ a.T) @ b.T, atol=1e-5)
    assert torch.allclose(reference_lora_linear(x, w, None, a, b, 1.0), F.linear(x, w + b @ a), atol=1e-5)


def test_adapter_updates_are_seen() -> None:
    """After every optimizer step the layer computes with the updated adapter (no stale casts)."""
    g = torch.Generator().manual_seed(6)
    x = torch.randn(8, 16, generator=g, dtype=torch.bfloat16)
    w = torch.randn(12, 16, generator=g, dtype=torch.bfloat16)
    a = torch.randn(4, 16, generator=g).requires_grad_(True)
    b = torch.randn(12, 4, generator=g).requires_grad_(True)
    opt = torch.optim.AdamW([a, b], lr=0.1)
    for _ in range(3):
        y = lora_linear(x, lambda dt: w.to(dt), None, a, b, 1.0)
        assert _rel(y, reference_lora_linear(x, w, None, a, b, 1.0)) < 1e-2
        y.float().square().mean().backward()
        opt.step()
        opt.zero_grad()


def test_frozen_adapter_casts_are_made_once_and_dropped_after() -> None:
    """Inside `frozen()` each adapter weight is cast once for every pass; outside, updates are seen at once."""
    from loratune.kernels.lora_linear import AdapterCasts

    g = torch.Generator().manual_seed(7)
    x = torch.randn(6, 16, generator=g, dtype=torch.float64)
    w = torch.randn(10, 16, generator=g, dtype=torch.float64)
    a = torch.randn(4, 16, generator=g, dtype=torch.float32).requires_grad_(True)
    b = torch.randn(10, 4, generator=g, dtype=torch.float32).requires_grad_(True)
    casts = AdapterCasts()
    plain = lora_linear(x, lambda dt: w.to(dt), None, a, b, 0.5)
    want = torch.autograd.grad(plain.square().sum(), (a, b))
    with casts.frozen():
        ys = [lora_linear(x, lambda dt: w.to(dt), None, a, b, 0.5, casts=casts) for _ in range(3)]
        assert len(casts.copies) == 2  # one copy of A and one of B, shared by the three forwards
        assert all(torch.equal(y, plain) for y in ys)
        got = torch.autograd.grad(ys[0].square().sum(), (a, b))
    assert all(torch.equal(u, v) and u.dtype == torch.float32 for u, v in zip(got, want))
    assert casts.copies == {} and not casts.active
    with torch.no_grad():
        b.add_(1.0)  # an update after the window is seen by the next call
    after = lora_linear(x, lambda dt: w.to(dt), None, a, b, 0.5, casts=casts)
    assert torch.allclose(after, reference_lora_linear(x, w, None, a, b, 0.5), rtol=1e-10)
    assert not torch.allclose(after, plain)


def test_tracked_adapter_casts_are_made_together() -> None:
    """With the model's adapter weights tracked, the first request in a window casts all of them (multi-tensor
    copy), each equal to its own cast; a second window casts afresh (an update in between is seen)."""
    from loratune.kernels.lora_linear import AdapterCasts

    g = torch.Generator().manual_seed(3)
    params = [torch.randn(4, 16, generator=g).requires_grad_(True) for _ in range(5)]
    casts = AdapterCasts()
    casts.track(params)
    with casts.frozen():
        first = casts.get(params[2], torch.bfloat16)
        assert len(casts.copies) == 5
        assert torch.equal(first, params[2].detach().to(torch.bfloat16))
        assert all(torch.equal(casts.get(p, torch.bfloat16), p.detach().to(torch.bfloat16)) for p in params)
        assert all(casts.get(p, torch.bfloat16) is casts.copies[(id(p), torch.bfloat16, 1.0)] for p in params)
        assert len(casts.copies) == 5
    with torch.no_grad():
        params[0].add_(1.0)
    with casts.frozen():
        assert torch.equal(casts.get(params[0], torch.bfloat16), params[0].detach().to(torch.bfloat16))
    # a tracked scale (a B matrix) is folded into its cast, batched or not, inside a window or outside
    casts.track(params, {id(params[1]): 2.5})
    want = params[1].detach().to(torch.bfloat16) * 2.5
    with casts.frozen():
        got = casts.get(params[1], torch.bfloat16, 2.5)
        assert len(casts.copies) == 5 and torch.equal(got, want)
        assert casts.get(params[1], torch.bfloat16, 2.5) is got
    assert torch.equal(casts.get(params[1], torch.bfloat16, 2.5), want)
    fp32 = casts.get(params[1], torch.float32, 2.5)  # same dtype: a new tensor, the parameter untouched
    assert fp32 is not params[1] and torch.equal(fp32, params[1].detach() * 2.5)


# ------------------------------------------------------------------------------- rmsnorm, swiglu


def test_rmsnorm_and_swiglu_backward_match_autograd_fp64() -> None:
    """The hand-written backward passes (the plain-PyTorch path of the kernels) equal autograd's."""
    from loratune.kernels.norm_swiglu import rms_norm, silu_mul

    g = torch.Generator().manual_seed(8)
    x = torch.randn(3, 5, 24, generator=g, dtype=torch.float64, requires_grad=True)
    w = 1 + 0.1 * torch.randn(24, generator=g, dtype=torch.float64)
    up = torch.randn(3, 5, 24, generator=g, dtype=torch.float64, requires_grad=True)
    ref_norm = w * (x * torch.rsqrt(x.square().mean(-1, keepdim=True) + 1e-6))
    ref = F.silu(ref_norm) * up
    got = silu_mul(rms_norm(x, w, 1e-6), up)
    assert torch.allclose(got, ref, rtol=1e-12, atol=1e-12)
    probe = torch.randn(ref.shape, generator=g, dtype=torch.float64)
    want_grads = torch.autograd.grad((ref * probe).sum(), (x, up))
    got_grads = torch.autograd.grad((got * probe).sum(), (x, up))
    assert all(_rel(a, b) < 1e-12 for a, b in zip(got_grads, want_grads))


def test_checkpoint_recompute_skips_the_last_lora_main_product() -> None:
    """Under non-reentrant checkpointing the block's last LoRA layer is not dequantized or multiplied again
    in the recompute (its main node saves nothing), and the gradients are those of the plain block."""
    from torch.utils.checkpoint import checkpoint

    g = torch.Generator().manual_seed(10)
    x = torch.randn(2, 5, 16, generator=g, dtype=torch.float64, requires_grad=True)
    w1, w2 = torch.randn(24, 16, generator=g, dtype=torch.float64), torch.randn(16, 24, generator=g, dtype=torch.float64)
    a1, b1 = torch.randn(4, 16, generator=g, dtype=torch.float64), torch.randn(24, 4, generator=g, dtype=torch.float64)
    a2, b2 = torch.randn(4, 24, generator=g, dtype=torch.float64), torch.randn(16, 4, generator=g, dtype=torch.float64)
    params = [p.requires_grad_(True) for p in (a1, b1, a2, b2)]
    calls = {"w1": 0, "w2": 0}

    def weight(name: str, w: torch.Tensor):
        def fn(dt: torch.dtype) -> torch.Tensor:
            calls[name] += 1
            return w.to(dt)
        return fn

    def block(h: torch.Tensor) -> torch.Tensor:
        mid = F.silu(lora_linear(h, weight("w1", w1), None, a1, b1, 0.5))
        return h + lora_linear(mid, weight("w2", w2), None, a2, b2, 0.5, split=True)  # the block's last layer

    def plain(h: torch.Tensor) -> torch.Tensor:
        mid = F.silu(reference_lora_linear(h, w1, None, a1, b1, 0.5))
        return h + reference_lora_linear(mid, w2, None, a2, b2, 0.5)

    got = checkpoint(block, x, use_reentrant=False)
    grads = torch.autograd.grad(got.square().sum(), [x, *params])
    assert calls == {"w1": 3, "w2": 2}  # w1: forward, recompute, backward; w2: forward, backward only
    want = plain(x)
    want_grads = torch.autograd.grad(want.square().sum(), [x, *params])
    assert torch.allclose(got, want, rtol=1e-12)
    assert all(_rel(a, b) < 1e-12 for a, b in zip(grads, want_grads))
