"""LoRA layers sharing an input as one node (loratune.kernels.lora_group, through the decoder's
`project_group`) against the layers run one by one."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from loratune.config import load_config
from loratune.decoder.load import build_decoder
from loratune.decoder.lora import project_group
from loratune.kernels.lora_group import LoRAGroup


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def _decoder(path: Path, dropout: float = 0.0, bits: int = 16):
    cfg = load_config(None, [f"model.path={path}", f"quantization.bits={bits}", "quantization.compute_dtype=fp32",
                             "adapter.rank=4", f"adapter.dropout={dropout}"])
    decoder = build_decoder(cfg)
    decoder.train()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # B starts at zero (the update is then 0 and its gradient paths untested): give it values
        for n, p in decoder.named_parameters():
            if "lora_B" in n:
                p.copy_(0.1 * torch.randn(p.shape, generator=g).to(p.device))
    return decoder


def _outputs_and_grads(layers, x, fn, upstream):
    ys = fn(layers, x)
    params = [p for layer in layers for n, p in layer.named_parameters() if "lora_" in n]
    loss = sum((y * u).sum() for y, u in zip(ys, upstream))
    grads = torch.autograd.grad(loss, [x, *params])
    return ys, grads


@pytest.mark.parametrize("bits", [16, 4])
def test_group_equals_layers_one_by_one(tiny_llama: Path, bits: int) -> None:
    """The decoder's q/k/v: outputs and gradients (input, every A and B) as the separate fused layers."""
    decoder = _decoder(tiny_llama, bits=bits)
    attn = decoder.layers[0].attn
    layers = [attn.q_proj, attn.k_proj, attn.v_proj]
    g = torch.Generator().manual_seed(2)
    dev = next(decoder.parameters()).device  # the GPU machine loads the model on CUDA
    x = torch.randn(2, 5, layers[0].in_features, generator=g).to(dev).requires_grad_(True)
    upstream = [torch.randn(2, 5, layer.out_features, generator=g).to(dev) for layer in layers]
    calls = []
    original = LoRAGroup.apply
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(LoRAGroup, "apply", lambda *a: calls.append(1) or original(*a))
        got_y, got_g = _outputs_and_grads(layers, x, project_group, upstream)
    assert calls == [1]  # really one node
    want_y, want_g = _outputs_and_grads(layers, x, lambda ls, x: [layer(x) for layer in ls], upstream)
    for a, b in zip([*got_y, *got_g], [*want_y, *want_g]):
        assert a.shape == b.shape and _rel(a, b) < 1e-5
    assert all(gr.abs().sum() > 0 for gr in got_g)


def test_group_node_fp64_with_bias_and_unused_output() -> None:
    """The node's math in fp64: members of different ranks and scales, one with a bias, one output unused."""
    from loratune.kernels.lora_linear import reference_lora_linear

    g = torch.Generator().manual_seed(3)
    t, d = 7, 24
    specs = [(16, 4, 0.5, True), (8, 2, 2.0, False), (8, 4, 1.0, False)]  # out, rank, scale, bias

    class Plan:  # what LoRAGroup reads of each member (lora_group.GroupMember)
        def __init__(self, w, bias, scale):
            self.weight_fn, self.scale = (lambda dt, w=w: w.to(dt)), scale
            self.base = type("Base", (), {"bias": bias})()

    x = torch.randn(t, d, generator=g, dtype=torch.float64, requires_grad=True)
    ws = [torch.randn(o, d, generator=g, dtype=torch.float64) for o, _, _, _ in specs]
    biases = [torch.randn(o, generator=g, dtype=torch.float64) if b else None for o, _, _, b in specs]
    As = [torch.randn(r, d, generator=g, dtype=torch.float64, requires_grad=True) for _, r, _, _ in specs]
    Bs = [torch.randn(o, r, generator=g, dtype=torch.float64, requires_grad=True) for o, r, _, _ in specs]
    plans = tuple(Plan(w, b, s) for w, b, (_, _, s, _) in zip(ws, biases, specs))
    scaled_bs = [b.detach() * s for b, (_, _, s, _) in zip(Bs, specs)]  # the casts carry the scales
    ys = LoRAGroup.apply(x, torch.cat([a.detach() for a in As]), plans, *As, *Bs, *scaled_bs)
    refs = [reference_lora_linear(x, w, b, a, bb, s) for w, b, a, bb, (_, _, s, _) in zip(ws, biases, As, Bs, specs)]
    up = [torch.randn(y.shape, generator=g, dtype=torch.float64) for y in ys]
    got = torch.autograd.grad((ys[0] * up[0]).sum() + (ys[1] * up[1]).sum(), [x, *As, *Bs], allow_unused=True)
    want = torch.autograd.grad((refs[0] * up[0]).sum() + (refs[1] * up[1]).sum(), [x, *As, *Bs], allow_unused=True)
    for y, r in zip(ys, refs):
        assert _rel(y, r) < 1e-12
    for a, b in zip(got, want):
        if b is None or not b.abs().sum():  # the unused member's A and B get no (or zero) gradient either way
            assert a is None or not a.abs().sum()
        else:
            assert _rel(a, b) < 1e-12


def test_group_falls_back_with_dropout_and_without_adapters(tiny_llama: Path) -> None:
    decoder = _decoder(tiny_llama, dropout=0.1)
    mlp = decoder.layers[0].mlp
    x = torch.randn(1, 3, mlp.gate_proj.in_features).to(next(decoder.parameters()).device)
    calls = []
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(LoRAGroup, "apply", lambda *a: calls.append(1))
        got = project_group([mlp.gate_proj, mlp.up_proj], x)  # dropout active in train mode: one by one
        plain = _decoder(tiny_llama)
        pm = plain.layers[0].mlp
        pm.up_proj.remove_adapter()  # one member without an adapter: one by one
        assert len(project_group([pm.gate_proj, pm.up_proj], x)) == 2
    assert calls == [] and len(got) == 2
