"""GPU checks: each fast kernel against its plain-PyTorch reference on random inputs (forward and gradients).

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


def _tiny_cuda_model(tiny_llama: Path, *overrides: str):
    from loratune.config import load_config
    from loratune.model.adapters import attach_adapters
    from loratune.model.load import load_base

    cfg = load_config(None, [f"model.path={tiny_llama}", "adapter.rank=8", "adapter.dropout=0",
                             "quantization.compute_dtype=bf16", *overrides])
    model = load_base(cfg)
    model.to("cuda")
    model = attach_adapters(model, cfg.adapter)
    model.train()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    return model, cfg


@pytest.mark.parametrize("bits", [4, 16])
def test_apply_matches_plain_model(tiny_llama: Path, bits: int) -> None:
    """Whole model: loss and LoRA gradients with every swap equal those of the untouched model."""
    from loratune.kernels import apply
    from loratune.train.loss import full_logits_loss_sum, lm_loss_sum

    model, cfg = _tiny_cuda_model(tiny_llama, f"quantization.bits={bits}")
    ids = torch.randint(5, 400, (2, 64), device="cuda", generator=torch.Generator(device="cuda").manual_seed(1))
    batch = {"input_ids": ids, "labels": ids}
    params = [p for p in model.parameters() if p.requires_grad]

    def loss_and_grads(fn):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            s, n = fn(model, batch)
        loss = s / n
        return loss, torch.autograd.grad(loss, params)

    want_loss, want = loss_and_grads(full_logits_loss_sum)
    apply(model, cfg)
    counts = model._loratune_kernels
    assert counts["lora"] == 7 * model.config.num_hidden_layers
    if "rope" in counts:  # liger-kernel installed
        assert counts["rope"] == model.config.num_hidden_layers
    assert counts["embed_offload"] == (0 if model.config.tie_word_embeddings else 1)
    got_loss, got = loss_and_grads(lm_loss_sum)
    assert _rel(got_loss, want_loss) < 2e-3
    assert _rel(torch.cat([g.flatten() for g in got]), torch.cat([g.flatten() for g in want])) < 3e-2


def test_norm_swiglu_swaps_match_originals(tiny_llama: Path) -> None:
    from loratune.kernels.fused_ops import swap_rms_norms, swap_swiglu_mlps

    model, _ = _tiny_cuda_model(tiny_llama, "quantization.bits=16")
    norm = model.get_base_model().model.norm
    mlp = model.get_base_model().model.layers[0].mlp
    x = torch.randn(2, 32, model.config.hidden_size, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    want_n, want_m = norm(x), mlp(x)
    gn = torch.autograd.grad(want_n.float().square().sum(), x)[0]
    gm = torch.autograd.grad(want_m.float().square().sum(), x)[0]
    assert swap_rms_norms(model) == 2 * model.config.num_hidden_layers + 1
    assert swap_swiglu_mlps(model) == model.config.num_hidden_layers
    got_n, got_m = norm(x), mlp(x)
    assert _rel(got_n, want_n) < 1e-2 and _rel(got_m, want_m) < 1e-2
    assert _rel(torch.autograd.grad(got_n.float().square().sum(), x)[0], gn) < 2e-2
    assert _rel(torch.autograd.grad(got_m.float().square().sum(), x)[0], gm) < 2e-2


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


def test_host_embedding_gathers_on_the_gpu() -> None:
    from loratune.kernels.offload import HostEmbedding

    emb = torch.nn.Embedding(1000, 4096, device="cuda", dtype=torch.bfloat16)
    host = HostEmbedding(emb, torch.device("cuda"))
    for seed in range(2):
        ids = torch.randint(0, 1000, (2, 777), device="cuda", generator=torch.Generator(device="cuda").manual_seed(seed))
        assert torch.equal(host(ids), emb(ids))
    assert host.direct  # the GPU read the pinned table itself (no host gather fallback)


def test_graphed_micro_batches_equal_eager(tiny_llama: Path, caplog) -> None:
    """Forward + backward by CUDA graph replay gives the eager loss and gradients, batch after batch,
    with the optimizer's zero_grad(set_to_none=True) in between; padded batches are left to the caller."""
    from loratune.kernels import apply, frozen_adapters
    from loratune.kernels.graphs import GraphedMicroBatch
    from loratune.train.loss import lm_loss_sum, lm_loss_sum_all_rows

    import logging

    caplog.set_level(logging.INFO, logger="loratune.kernels.graphs")
    model, cfg = _tiny_cuda_model(tiny_llama, "quantization.bits=4")
    apply(model, cfg)
    params = [p for p in model.parameters() if p.requires_grad]
    graphs = GraphedMicroBatch(model, lm_loss_sum_all_rows, torch.bfloat16)
    gen = torch.Generator().manual_seed(3)
    batches = [torch.randint(5, 400, (2, 64), generator=gen) for _ in range(6)]
    for i, ids in enumerate(batches):
        batch = {"input_ids": ids, "labels": ids}
        n = 2 * 63
        with frozen_adapters(model), torch.autocast("cuda", dtype=torch.bfloat16):
            want, _ = lm_loss_sum(model, {"input_ids": ids.cuda(), "labels": ids.cuda()})
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
    padded = {"input_ids": batches[0], "labels": batches[0], "attention_mask": torch.ones_like(batches[0])}
    padded["attention_mask"][0, -3:] = 0
    assert graphs.run(padded, 1.0) is None
