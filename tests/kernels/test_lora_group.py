"""LoRA layers sharing an input as one node (loratune.kernels.lora_group) against the layers run one by one."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from loratune.config import load_config
from loratune.kernels.fused_ops import swap_swiglu_mlps
from loratune.kernels.lora_group import LoRAGroup, project_shared
from loratune.kernels.lora_linear import AdapterCasts, swap_lora_layers
from loratune.model.adapters import attach_adapters
from loratune.model.load import load_base


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def _model(path: Path, dropout: float = 0.0, bits: int = 16):
    cfg = load_config(None, [f"model.path={path}", f"quantization.bits={bits}", "quantization.compute_dtype=fp32",
                             "adapter.rank=4", f"adapter.dropout={dropout}"])
    model = attach_adapters(load_base(cfg), cfg.adapter)
    model.train()
    return model


def _randomize_b(model: torch.nn.Module, seed: int) -> None:
    """peft starts B at zero (the update is then 0 and its gradient paths untested): give it values."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(0.1 * torch.randn(p.shape, generator=g).to(p.device))


def _outputs_and_grads(layers, x, fn, upstream):
    ys = fn(layers, x)
    params = [p for layer in layers for n, p in layer.named_parameters() if "lora_" in n]
    loss = sum((y * u).sum() for y, u in zip(ys, upstream))
    grads = torch.autograd.grad(loss, [x, *params])
    return ys, grads


@pytest.mark.parametrize("bits", [16, 4])
def test_group_equals_layers_one_by_one(tiny_llama: Path, bits: int) -> None:
    """q/k/v of a swapped peft model: outputs and gradients (input, every A and B) as the separate fused layers."""
    model = _model(tiny_llama, bits=bits)
    _randomize_b(model, 1)
    swap_lora_layers(model)
    attn = model.get_base_model().model.layers[0].self_attn
    layers = (attn.q_proj, attn.k_proj, attn.v_proj)
    g = torch.Generator().manual_seed(2)
    dev = next(model.parameters()).device  # the GPU machine loads the model on CUDA
    x = torch.randn(2, 5, model.config.hidden_size, generator=g).to(dev).requires_grad_(True)
    upstream = [torch.randn(2, 5, layer.out_features, generator=g).to(dev) for layer in layers]
    calls = []
    original = LoRAGroup.apply
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(LoRAGroup, "apply", lambda *a: calls.append(1) or original(*a))
        got_y, got_g = _outputs_and_grads(layers, x, project_shared, upstream)
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

    class Plan:  # what LoRAGroup reads from a FusedPlan
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


def test_group_falls_back_with_dropout_and_when_not_fused(tiny_llama: Path) -> None:
    model = _model(tiny_llama, dropout=0.1)
    swap_lora_layers(model)
    mlp = model.get_base_model().model.layers[0].mlp
    x = torch.randn(1, 3, model.config.hidden_size).to(next(model.parameters()).device)
    calls = []
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(LoRAGroup, "apply", lambda *a: calls.append(1))
        torch.manual_seed(0)
        got = project_shared((mlp.gate_proj, mlp.up_proj), x)  # dropout active in train mode: one by one
        model.eval()
        plain = _model(tiny_llama)  # never swapped: one by one
        pm = plain.get_base_model().model.layers[0].mlp
        assert len(project_shared((pm.gate_proj, pm.up_proj), x)) == 2
    assert calls == [] and len(got) == 2


def test_swapped_mlp_groups_gate_and_up_and_matches(tiny_llama: Path) -> None:
    """A whole swapped model (LoRA layers + SwiGLU MLPs, gate/up grouped) against the plain peft model."""
    plain = _model(tiny_llama)
    fused = _model(tiny_llama)
    _randomize_b(plain, 5)
    _randomize_b(fused, 5)
    fused.load_state_dict(plain.state_dict())
    swap_lora_layers(fused)
    assert swap_swiglu_mlps(fused) == fused.config.num_hidden_layers
    ids = torch.randint(3, fused.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(6))
    ids = ids.to(next(fused.parameters()).device)

    def run(model):
        out = model(input_ids=ids, labels=ids)
        params = [p for n, p in model.named_parameters() if p.requires_grad]
        return out.loss, torch.autograd.grad(out.loss, params)

    assert isinstance(fused._loratune_casts, AdapterCasts)
    (lw, gw), (lg, gg) = run(plain), run(fused)
    assert torch.allclose(lg, lw, rtol=1e-5)
    assert max(_rel(a, b) for a, b in zip(gg, gw)) < 1e-4
