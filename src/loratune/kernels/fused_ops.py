"""Fused RMSNorm and SwiGLU for Llama-style blocks, through liger-kernel's Triton functions, per instance.

Why: in a bf16 decoder block the elementwise work around the matrix products (RMSNorm's fp32 upcast,
SiLU then the gate product) makes several passes over [tokens, hidden] and [tokens, intermediate]
tensors in each of the forward, recompute and backward passes; one kernel each does it in one pass.

Only the forwards of the given model's own module instances change (no class or module-level
patching). A module qualifies by what it computes, checked from its attributes, not by model name:
- RMSNorm: `weight * (x * rsqrt(mean(x^2) + eps)).to(dtype)` with the eps in `variance_epsilon` (the
  Llama/Qwen2/Mistral form; Gemma's `(1 + weight)` form stores `eps` and is left alone);
- MLP: `down_proj(act_fn(gate_proj(x)) * up_proj(x))` with a SiLU `act_fn`.
The plain references are the modules' own original forwards (see tests/gpu).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

LLAMA_RMSNORM_CLASSES = ("LlamaRMSNorm", "Qwen2RMSNorm", "MistralRMSNorm", "Qwen3RMSNorm")


def liger_available() -> bool:
    try:
        import liger_kernel.ops.rms_norm  # noqa: F401
        import liger_kernel.ops.swiglu  # noqa: F401
    except ImportError:
        return False
    return True


def _is_llama_rmsnorm(m: nn.Module) -> bool:
    return (type(m).__name__ in LLAMA_RMSNORM_CLASSES and hasattr(m, "variance_epsilon")
            and isinstance(getattr(m, "weight", None), torch.Tensor) and m.weight.dim() == 1)


def _is_silu(act: nn.Module) -> bool:
    return isinstance(act, nn.SiLU) or type(act).__name__ in ("SiLUActivation", "SiLU")


def _is_swiglu_mlp(m: nn.Module) -> bool:
    return all(hasattr(m, a) for a in ("gate_proj", "up_proj", "down_proj", "act_fn")) and _is_silu(m.act_fn)


def swap_rms_norms(model: nn.Module) -> int:
    from liger_kernel.ops.rms_norm import LigerRMSNormFunction

    n = 0
    for m in model.modules():
        if not _is_llama_rmsnorm(m) or getattr(m, "_loratune_fused", False):
            continue

        def forward(x: Tensor, m: nn.Module = m) -> Tensor:
            # casting_mode "llama": rstd in fp32, normalised x cast back before the weight product (as HF).
            # in_place=False: dY is not overwritten, safe whatever else reads it.
            return LigerRMSNormFunction.apply(x, m.weight, m.variance_epsilon, 0.0, "llama", False)

        m.forward = forward
        m._loratune_fused = True
        n += 1
    return n


def swap_swiglu_mlps(model: nn.Module) -> int:
    from liger_kernel.ops.swiglu import LigerSiLUMulFunction

    n = 0
    for m in model.modules():
        if not _is_swiglu_mlp(m) or getattr(m, "_loratune_fused", False):
            continue

        def forward(x: Tensor, m: nn.Module = m) -> Tensor:
            return m.down_proj(LigerSiLUMulFunction.apply(m.gate_proj(x), m.up_proj(x)))

        m.forward = forward
        m._loratune_fused = True
        n += 1
    return n
