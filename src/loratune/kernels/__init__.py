"""Fast paths for training on a CUDA GPU, each with its plain-PyTorch reference beside it.

One entry point, called explicitly by the loader (nothing is patched at import time):
`apply(model, cfg)` swaps the forwards of this model instance's own modules, on CUDA only, when the
config's `model.kernels` is `auto` or true (the default; false/off leaves the model untouched). What it swaps:
- `lora`: every peft LoRA linear over a 4-bit or 16-bit base -> one autograd function (bf16 adapter
  products, Triton NF4 dequantization); `loratune.kernels.lora_linear`; the swapped attention and MLP
  forwards run layers that share an input (q/k/v, gate/up) as one node (`loratune.kernels.lora_group`);
- `rmsnorm`, `swiglu`: Llama-style RMSNorm (frozen weight) and SiLU-gated MLPs -> one Triton kernel
  per direction each (`loratune.kernels.norm_swiglu`);
- `rope`: the RoPE of Llama/Qwen2/Mistral attention -> liger-kernel's fused RoPE, when liger-kernel is
  installed (`loratune.kernels.fused_ops`).
- `embed_offload`: the frozen, untied input embedding table moves to pinned host memory (1 GB less GPU
  memory for a 128k vocabulary); `loratune.kernels.offload`.
Not swaps, used by the training loop: `loratune.kernels.causal_mask` (SDPA's causal kernels for unpadded
batches, decided on the host, also inside CUDA graph captures) and `loratune.kernels.graphs`.
The loss is not a module swap: every run's loss (`loratune.train.loss.lm_loss_sum`) goes through
`loratune.kernels.loss` (linear cross-entropy in row chunks, gradient computed in the forward pass;
exact, any device).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

import torch
from torch import nn

log = logging.getLogger(__name__)

ALL = ("lora", "rmsnorm", "swiglu", "rope", "embed_offload")


def apply(model: nn.Module, cfg, only: tuple[str, ...] | None = None) -> nn.Module:
    """Swap in the fused forwards named in `only` (default: all) on this CUDA model; returns the model."""
    mode = getattr(getattr(cfg, "model", None), "kernels", "auto")
    if mode is False or mode == "off":
        return model
    if mode not in ("auto", True):
        raise ValueError(f"model.kernels: expected auto, true or false, got {mode!r}")
    params = list(model.parameters())
    if not params or not params[0].is_cuda:
        return model
    wanted = set(ALL if only is None else only)
    counts: dict[str, int] = {}
    if "lora" in wanted:
        from loratune.kernels.lora_linear import swap_lora_layers

        counts["lora"] = swap_lora_layers(model)
    if wanted & {"rmsnorm", "swiglu", "rope"}:
        from loratune.kernels.fused_ops import liger_available, swap_attention_rope, swap_rms_norms, swap_swiglu_mlps

        if "rmsnorm" in wanted:
            counts["rmsnorm"] = swap_rms_norms(model)
        if "swiglu" in wanted:
            counts["swiglu"] = swap_swiglu_mlps(model)
        if "rope" in wanted:
            if liger_available():
                counts["rope"] = swap_attention_rope(model)
            else:
                log.info("liger-kernel is not installed: RoPE keeps its plain forward")
    if "embed_offload" in wanted:
        from loratune.kernels.offload import offload_input_embedding

        counts["embed_offload"] = offload_input_embedding(model)
        torch.cuda.empty_cache()
    log.info("fused kernels: %s", ", ".join(f"{k} x{v}" for k, v in counts.items()) or "none")
    model._loratune_kernels = counts
    return model



@contextlib.contextmanager
def frozen_adapters(model: nn.Module) -> Iterator[None]:
    """Promise that no adapter weight changes inside: the fused LoRA layers then cast each adapter weight
    to the compute dtype once for all passes inside (the training loop wraps one optimizer step's forward
    and backward passes in it). A no-op for a model without fused layers."""
    casts = getattr(model, "_loratune_casts", None)
    if casts is None and isinstance(getattr(model, "module", None), nn.Module):  # a wrapper (DDP)
        casts = getattr(model.module, "_loratune_casts", None)
    if casts is None:
        yield
        return
    with casts.frozen():
        yield
