"""GPU checks: each fast kernel against its plain-PyTorch reference on random inputs (forward and gradients),
and CUDA graph replay of loratune's decoder against its eager pass. (The decoder as a whole against transformers
+ peft as they ship: tests/decoder/test_decoder_gpu.py.)

Run on the GPU machine: `python -m pytest tests/gpu -q -m gpu`. Skipped without CUDA.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def _quantize(out_f: int, in_f: int, nested: bool, quant_type: str = "nf4", seed: int = 0):
    import bitsandbytes.functional as bnbf

    g = torch.Generator(device="cuda").manual_seed(seed)
    w = (0.02 * torch.randn(out_f, in_f, generator=g, device="cuda")).to(torch.bfloat16)
    packed, qs = bnbf.quantize_4bit(w, blocksize=64, compress_statistics=nested, quant_type=quant_type,
                                    quant_storage=torch.uint8)
    return w, packed, qs


@pytest.mark.parametrize("shape", [(1024, 4096), (333, 192), (7, 9)])
@pytest.mark.parametrize("nested", [True, False])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_triton_dequant_matches_bitsandbytes(shape, nested, quant_type, dtype) -> None:
    import bitsandbytes.functional as bnbf

    from loratune.kernels._nf4_triton import dequantize_nf4_triton
    from loratune.kernels.nf4 import reference_dequantize_nf4

    _, packed, qs = _quantize(*shape, nested, quant_type)
    qs.dtype = dtype
    want = bnbf.dequantize_4bit(packed, qs)
    got = dequantize_nf4_triton(packed, qs, dtype, direct=False)  # the JIT launch
    again = dequantize_nf4_triton(packed, qs, dtype)  # the cached compiled kernel, launched directly
    assert torch.equal(got, again)
    assert got.dtype == want.dtype == dtype
    # same fp32 products, one rounding to the output dtype: equal, at most one ulp apart
    torch.testing.assert_close(got, want, rtol=8e-3, atol=0)
    torch.testing.assert_close(reference_dequantize_nf4(packed, qs), want, rtol=8e-3, atol=0)
    assert (got == want).float().mean() > 0.999


@pytest.mark.parametrize("four_bit", [True, False])
@pytest.mark.parametrize("dropout", [False, True])
def test_lora_linear_matches_reference(four_bit: bool, dropout: bool) -> None:
    from loratune.kernels.lora_linear import lora_linear, reference_lora_linear
    from loratune.kernels.nf4 import dequantize_nf4, reference_dequantize_nf4

    torch.manual_seed(0)
    t, d_in, d_out, r, s = 1000, 1024, 2816, 16, 2.0
    w, packed, qs = _quantize(d_out, d_in, nested=True)
    dense = reference_dequantize_nf4(packed, qs) if four_bit else w
    weight_fn = (lambda dt: dequantize_nf4(packed, qs, dt)) if four_bit else (lambda dt: w.to(dt))
    x = torch.randn(2, t // 2, d_in, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    a = (0.02 * torch.randn(r, d_in, device="cuda")).requires_grad_(True)
    b = (0.02 * torch.randn(d_out, r, device="cuda")).requires_grad_(True)
    mask = (torch.rand(x.shape, device="cuda") > 0.1).to(x.dtype) / 0.9 if dropout else None
    g = torch.randn(2, t // 2, d_out, device="cuda", dtype=torch.bfloat16)

    def run(kind: str):
        xx = x.double() if kind == "fp64" else x
        x_l = xx * mask.to(xx.dtype) if dropout else None
        if kind == "fused":
            y = lora_linear(xx, weight_fn, None, a, b, s, x_l)
        else:
            aa, bb = (a.double(), b.double()) if kind == "fp64" else (a, b)
            y = reference_lora_linear(xx, dense.to(xx.dtype), None, aa, bb, s, x_l)
        return (y, *torch.autograd.grad(y, (x, a, b), g.to(y.dtype)))

    exact, fused, plain = run("fp64"), run("fused"), run("bf16")
    for name, f, p, e in zip(["y", "dx", "dA", "dB"], fused, plain, exact):
        assert f.dtype == p.dtype, name
        # bf16 products: the fused path is as close to the fp64 truth as plain bf16 autograd is
        assert _rel(f, e) < max(2 * _rel(p, e), 1e-2), (name, _rel(f, e), _rel(p, e))


@pytest.mark.parametrize("impl", ["chunked", "liger"])
@pytest.mark.parametrize("softcap", [None, 30.0])
def test_fused_ce_matches_reference_cuda(softcap, impl) -> None:
    from loratune.kernels.loss import fused_linear_cross_entropy_sum, reference_linear_cross_entropy_sum

    torch.manual_seed(0)
    h = torch.randn(3000, 512, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w = (0.05 * torch.randn(32000, 512, device="cuda")).to(torch.bfloat16).requires_grad_(True)
    y = torch.randint(0, 32000, (3000,), device="cuda")
    y[::7] = -100
    if impl == "liger":
        pytest.importorskip("liger_kernel")
    got, n = fused_linear_cross_entropy_sum(h, w, y, softcap=softcap, chunk_elements=1 << 24, impl=impl)
    want, n_want = reference_linear_cross_entropy_sum(h, w, y, softcap=softcap)
    assert int(n) == int(n_want)
    assert _rel(got, want) < 1e-4
    gh, gw = torch.autograd.grad(got, (h, w))
    eh, ew = torch.autograd.grad(want, (h, w))
    assert _rel(gh, eh) < 1e-2 and _rel(gw, ew) < 1e-2


@pytest.mark.parametrize("softcap", [None, 30.0])
def test_triton_ce_rows_match_the_pytorch_chunks(softcap, monkeypatch) -> None:
    """A frozen head in bf16 on CUDA takes the Triton chunk kernel (kernels/_ce_triton.py); the PyTorch chunks
    are its reference: same loss to fp32 rounding, the same d(hidden) to bf16 rounding."""
    import loratune.kernels.loss as loss_mod
    from loratune.kernels.loss import fused_linear_cross_entropy_sum, reference_linear_cross_entropy_sum

    torch.manual_seed(1)
    h = torch.randn(3000, 512, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w = (0.05 * torch.randn(32003, 512, device="cuda")).to(torch.bfloat16)  # frozen, odd vocabulary
    y = torch.randint(0, 32003, (3000,), device="cuda")
    y[::7] = -100
    got, n = fused_linear_cross_entropy_sum(h, w, y, softcap=softcap, chunk_elements=1 << 24)
    (gh,) = torch.autograd.grad(got, (h,))
    monkeypatch.setattr(loss_mod, "_triton_rows_available", lambda *a: False)
    plain, _ = fused_linear_cross_entropy_sum(h, w, y, softcap=softcap, chunk_elements=1 << 24)
    (ph,) = torch.autograd.grad(plain, (h,))
    want, _ = reference_linear_cross_entropy_sum(h, w, y, softcap=softcap)
    (eh,) = torch.autograd.grad(want, (h,))
    assert _rel(got, plain) < 1e-5 and _rel(got, want) < 1e-4
    assert _rel(gh, ph) < 5e-3 and _rel(gh, eh) < 1e-2


def test_swiglu_backward_over_its_inputs() -> None:
    """silu_mul(reuse_inputs=True): the same gradients, written over a and b; a second backward fails loudly."""
    from loratune.kernels.norm_swiglu import silu_mul

    torch.manual_seed(2)
    src = torch.randn(2, 300, 1000, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    up = torch.randn(2, 300, 1000, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    g = torch.randn(2, 300, 1000, device="cuda", dtype=torch.bfloat16)

    def grads(reuse: bool):
        a, b = src * 1.5, up * 0.5  # intermediate tensors that feed only the product
        y = silu_mul(a, b, reuse_inputs=reuse)
        return torch.autograd.grad(y, (src, up), g, retain_graph=reuse), (y, a)

    (ga, gb), _ = grads(False)
    (ra, rb), (y, a) = grads(True)
    assert torch.equal(ra, ga) and torch.equal(rb, gb)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        torch.autograd.grad(y, (src, up), g)


def test_adapter_updates_are_seen_with_fused_adamw() -> None:
    """The fused CUDA AdamW updates parameters in place without bumping their version counters: a
    cache of the bf16 adapter copies keyed on versions served stale weights (seen 2026-11-22)."""
    from loratune.kernels.lora_linear import lora_linear, reference_lora_linear

    torch.manual_seed(0)
    x = torch.randn(64, 256, device="cuda", dtype=torch.bfloat16)
    w = (0.05 * torch.randn(128, 256, device="cuda")).to(torch.bfloat16)
    a = (0.05 * torch.randn(8, 256, device="cuda")).requires_grad_(True)
    b = (0.05 * torch.randn(128, 8, device="cuda")).requires_grad_(True)
    opt = torch.optim.AdamW([a, b], lr=0.05, fused=True)
    for _ in range(3):
        y = lora_linear(x, lambda dt: w.to(dt), None, a, b, 1.0)
        assert _rel(y, reference_lora_linear(x, w, None, a, b, 1.0)) < 1e-2
        y.float().square().mean().backward()
        opt.step()
        opt.zero_grad()


@pytest.mark.parametrize("rows,dim", [(4096, 4096), (37, 3584), (5, 100)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_rmsnorm_and_swiglu_kernels_match_fp64(rows: int, dim: int, dtype: torch.dtype) -> None:
    """The Triton kernels (direct launches after the first) against fp64 math, every element written."""
    from loratune.kernels.norm_swiglu import rms_norm, silu_mul

    tol = {torch.bfloat16: 1e-2, torch.float16: 2e-3, torch.float32: 1e-5}[dtype]
    for seed in range(3):  # the later calls take the direct-launch path
        g = torch.Generator(device="cuda").manual_seed(seed)
        x = torch.randn(rows, dim, generator=g, device="cuda").to(dtype).requires_grad_(True)
        w = (1 + 0.1 * torch.randn(dim, generator=g, device="cuda")).to(dtype)
        up = torch.randn(rows, dim, generator=g, device="cuda").to(dtype).requires_grad_(True)
        probe = torch.randn(rows, dim, generator=g, device="cuda", dtype=torch.float64)
        xd, upd = x.detach().double().requires_grad_(True), up.detach().double().requires_grad_(True)
        ref = torch.nn.functional.silu(w.double() * xd * torch.rsqrt(xd.square().mean(-1, keepdim=True) + 1e-5)) * upd
        got = silu_mul(rms_norm(x, w, 1e-5), up)
        assert torch.isfinite(got).all() and _rel(got, ref) < tol
        want = torch.autograd.grad((ref * probe).sum(), (xd, upd))
        grads = torch.autograd.grad((got.double() * probe).sum(), (x, up))
        assert all(torch.isfinite(a).all() and _rel(a, b) < 2 * tol for a, b in zip(grads, want))


def test_graphed_streams_equal_eager(tiny_llama: Path, caplog) -> None:
    """loratune's decoder on fixed-shape padding-free streams: forward + backward by CUDA graph replay gives the
    eager loss and gradients, stream after stream (different sample boundaries, one shape), with the optimizer's
    zero_grad(set_to_none=True) in between; padded rows are left to the caller."""
    import logging

    from loratune.config import load_config
    from loratune.decoder.load import build_decoder
    from loratune.kernels.graphs import GraphedMicroBatch
    from loratune.train.runner import decoder_stream_loss_sum

    caplog.set_level(logging.INFO, logger="loratune.kernels.graphs")
    cfg = load_config(None, [f"model.path={tiny_llama}", "adapter.rank=8", "adapter.dropout=0",
                             "quantization.bits=4", "quantization.compute_dtype=bf16"])
    decoder = build_decoder(cfg).train()
    with torch.no_grad():
        for n, p in decoder.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    params = [p for p in decoder.parameters() if p.requires_grad]
    graphs = GraphedMicroBatch(decoder, decoder_stream_loss_sum)
    gen = torch.Generator().manual_seed(3)
    for i in range(6):
        cut = 20 + 7 * i  # two samples of 128 tokens in all, split differently each time
        ids = torch.randint(5, 400, (1, 128), generator=gen)
        positions = torch.cat([torch.arange(cut), torch.arange(128 - cut)]).unsqueeze(0)
        labels = ids.clone()
        labels[0, cut] = -100  # no position predicts the first token of the next sample
        batch = {"input_ids": ids, "labels": labels, "position_ids": positions}
        n = 126
        with decoder.frozen_adapters():
            want = decoder_stream_loss_sum(decoder, {k: v.cuda() for k, v in batch.items()})
        want_grads = torch.autograd.grad(want / n, params)
        want = want.detach()  # hold no autograd graph while the graphs capture (see loratune.kernels.graphs)
        for p in params:
            p.grad = None
        got = graphs.run(batch, 1.0 / n)
        if i < 2:
            assert got is None  # the first two micro-batches of a shape are eager (warm-up, then timed)
            graphs.eager_took(10.0)  # pretend eager is slow, so that a graph is kept
            continue
        assert got is not None and graphs.key is not None, caplog.text
        assert _rel(got, want) < 1e-3, (float(got), float(want))
        err = _rel(torch.cat([p.grad.flatten() for p in params]), torch.cat([g.flatten() for g in want_grads]))
        assert err < 2e-2, err
    assert graphs.replays == 4
    padded = {"input_ids": ids, "labels": ids, "attention_mask": torch.ones_like(ids)}
    assert graphs.run(padded, 1.0) is None


def test_model_kernels_false_is_the_same_decoder_without_triton(tiny_llama: Path, monkeypatch) -> None:
    """model.kernels false: no Triton kernel of loratune runs (each would raise here), and the loss and LoRA
    gradients are those of the default decoder (bf16, 4-bit base) within bf16 rounding."""
    from loratune.config import load_config
    from loratune.decoder import Boundaries
    from loratune.decoder.load import build_decoder
    from loratune.train.loss import decoder_loss_sum

    def run(kernels: str):
        cfg = load_config(None, [f"model.path={tiny_llama}", "adapter.rank=8", "adapter.dropout=0",
                                 "quantization.bits=4", "quantization.compute_dtype=bf16", f"model.kernels={kernels}"])
        torch.manual_seed(0)
        decoder = build_decoder(cfg).train()
        g = torch.Generator().manual_seed(4)
        with torch.no_grad():
            for n, p in decoder.named_parameters():
                if "lora_B" in n:
                    p.copy_(0.05 * torch.randn(p.shape, generator=g))
        ids = torch.randint(5, 400, (1, 96), generator=torch.Generator().manual_seed(5)).cuda()
        with decoder.frozen_adapters():
            loss, n = decoder_loss_sum(decoder, ids, Boundaries.from_lengths([40, 56], "cuda"), ids)
        params = [p for p in decoder.parameters() if p.requires_grad]
        return loss / n, torch.autograd.grad(loss / n, params)

    want_loss, want = run("auto")

    def refuse(*a, **k):
        raise AssertionError("a Triton kernel ran with model.kernels false")

    import loratune.kernels._ce_triton as ce
    import loratune.kernels._nf4_triton as nf4
    import loratune.kernels._norm_triton as norm

    for mod, name in ((norm, "rmsnorm_forward"), (norm, "rmsnorm_backward"), (norm, "swiglu_forward"),
                      (norm, "swiglu_backward"), (nf4, "dequantize_nf4_triton"), (ce, "ce_rows_inplace")):
        monkeypatch.setattr(mod, name, refuse)
    got_loss, got = run("false")
    assert _rel(got_loss, want_loss) < 2e-3
    assert _rel(torch.cat([g.flatten() for g in got]), torch.cat([g.flatten() for g in want])) < 3e-2
