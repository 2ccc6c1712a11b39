"""The decoder on a CUDA GPU: the Triton paths (NF4 dequantization, RMSNorm, SwiGLU, fused LoRA) and compiled
FlexAttention against the same references as on the CPU.

- fp32 compute (TF32 off), 4-bit NF4 base through bitsandbytes' CUDA kernels on the HF + peft side: logits
  and LoRA gradients agree as on the CPU;
- bf16 compute, 16-bit base: ours and HF + peft are compared with the fp32 model; ours may not be less
  accurate than the stock path (its LoRA products run in bf16 where peft's run in fp32, its norms and
  gated products in one kernel each);
- compiled FlexAttention (windows, soft-caps) equals the SDPA reference; `auto` picks it without flash-attn;
- cached generation equals the full forward pass.
Measured values are printed (run with -s).
"""

from __future__ import annotations

import pytest
import torch
from decoder_families import (
    LENGTHS,
    attach_random_lora,
    hf_logits,
    load_pair,
    run_config,
    sample_ids,
)

from loratune.decoder import Boundaries
from loratune.decoder.attention import flash_available, resolve_backend
from loratune.model.adapters import attach_adapters

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
              pytest.mark.usefixtures("exact_cuda_matmuls")]


def _ids() -> list[torch.Tensor]:
    return [i.cuda() for i in sample_ids()]


def _bounds() -> Boundaries:
    return Boundaries.from_lengths(LENGTHS, "cuda")


def _adapted_pair(cfg):
    hf, dec = load_pair(cfg)
    peft_model = attach_adapters(hf, cfg.adapter)
    dec.add_adapters(cfg.adapter.rank, cfg.adapter.alpha)
    attach_random_lora(dec, peft_model)
    return peft_model.train(), dec.train()


def _grad_errors(dec, peft_model) -> float:
    modules, worst = dict(peft_model.named_modules()), 0.0
    for name, layer in dec.adapted_layers().items():
        theirs = modules["base_model.model." + dec.hf_name(name)]
        for g, w in ((layer.lora_A.grad, theirs.lora_A["default"].weight.grad),
                     (layer.lora_B.grad, theirs.lora_B["default"].weight.grad)):
            worst = max(worst, ((g - w).abs().max() / w.abs().max()).item())
    return worst


@pytest.mark.parametrize("name", ["llama", "gemma2", "phi3"])
def test_4bit_fp32_on_cuda_matches_hf_peft(name, checkpoint, quiet):
    cfg = run_config(checkpoint(name), "quantization.bits=4", "quantization.compute_dtype=fp32")
    peft_model, dec = _adapted_pair(cfg)
    assert dec.layers[0].attn.o_proj.weight.is_cuda and dec.layers[0].attn.o_proj.quantized
    weights = torch.randn(sum(LENGTHS), 97, generator=torch.Generator().manual_seed(3)).cuda()
    ref = hf_logits(peft_model, _ids())
    (ref * weights).sum().backward()
    ours = dec(torch.cat(_ids()), _bounds())
    (ours * weights).sum().backward()
    logit_err, grad_err = (ours - ref).abs().max().item(), _grad_errors(dec, peft_model)
    print(f"\n{name} 4-bit fp32 cuda: logits {logit_err:.2e}, gradients {grad_err:.2e} (relative)")
    assert logit_err < 3e-5 and grad_err < 5e-5


@pytest.mark.parametrize("name", ["llama", "qwen3", "gemma2"])
def test_bf16_at_least_as_accurate_as_hf_peft(name, checkpoint, quiet):
    folder = checkpoint(name)
    _, ref_dec = _adapted_pair(run_config(folder))  # fp32 everywhere: the reference
    peft16, dec16 = _adapted_pair(run_config(folder, "quantization.bits=16", "quantization.compute_dtype=bf16"))
    assert dec16.compute_dtype == torch.bfloat16
    with torch.no_grad():
        want = ref_dec(torch.cat(_ids()), _bounds())
        ours = dec16(torch.cat(_ids()), _bounds()).float()
        theirs = hf_logits(peft16, _ids()).float()
    err_ours, err_theirs = (ours - want).abs().max().item(), (theirs - want).abs().max().item()
    print(f"\n{name} bf16: ours {err_ours:.3e}, HF + peft {err_theirs:.3e} (max abs vs fp32)")
    assert err_ours <= 1.5 * err_theirs + 1e-3


@pytest.mark.parametrize("name", ["qwen2", "gemma2"])
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_compiled_flex_equals_sdpa(name, dtype, checkpoint, quiet):
    bits = "32" if dtype == "fp32" else "16"
    _, dec = load_pair(run_config(checkpoint(name), f"quantization.bits={bits}", f"quantization.compute_dtype={dtype}"))
    assert resolve_backend("auto", torch.device("cuda"), dec.compute_dtype) == ("flash" if flash_available() and dtype == "bf16" else "flex")
    with torch.no_grad():
        ref = dec(torch.cat(_ids()), _bounds()).float()
        dec.attention = "flex"
        flex = dec(torch.cat(_ids()), _bounds()).float()
    err = (flex - ref).abs().max().item()
    print(f"\n{name} {dtype}: compiled flex vs sdpa {err:.2e}")
    assert err < (1e-5 if dtype == "fp32" else 3e-2)


def test_cached_generation_on_cuda(checkpoint, quiet):
    _, dec = load_pair(run_config(checkpoint("mistral")))
    rows = [i.cuda() for i in sample_ids((6, 3), seed=7)]
    cache = dec.new_cache(batch=2, capacity=16)
    with torch.no_grad():
        logits = dec(torch.cat(rows), cache.boundaries([6, 3]), cache=cache)[torch.tensor([5, 8])]
        for _ in range(8):
            full = dec(torch.cat(rows), Boundaries.from_lengths([len(r) for r in rows], "cuda"))
            full = full[torch.tensor([len(r) for r in rows]).cumsum(0) - 1]
            assert (logits - full).abs().max().item() < 1e-5
            nxt = full.argmax(-1)
            rows = [torch.cat([r, t[None]]) for r, t in zip(rows, nxt)]
            logits = dec(nxt[:, None], cache=cache)[:, -1]
