"""Fused RMSNorm, SwiGLU and RoPE for Llama-style blocks, per module instance.

Why: in a bf16 decoder block the elementwise work around the matrix products (RMSNorm's fp32 upcast,
SiLU then the gate product, RoPE's rotate-half) makes several passes over [tokens, hidden] and
[tokens, intermediate] tensors in each of the forward, recompute and backward passes; one kernel each
does it in one pass. RMSNorm and SwiGLU use loratune's own kernels (`norm_swiglu`), RoPE uses
liger-kernel's when it is installed.

Only the forwards of the given model's own module instances change (no class or module-level
patching). A module qualifies by what it computes, checked from its attributes, not by model name:
- RMSNorm: `weight * (x * rsqrt(mean(x^2) + eps)).to(dtype)` with the eps in `variance_epsilon` (the
  Llama/Qwen2/Mistral form; Gemma's `(1 + weight)` form stores `eps` and is left alone), weight frozen;
- MLP: `down_proj(act_fn(gate_proj(x)) * up_proj(x))` with a SiLU `act_fn`;
- attention: the Llama/Qwen2/Mistral attention classes (full-head rotate-half RoPE); their forward is
  rewritten here line for line with liger's RoPE in place of `apply_rotary_pos_emb` (the q/k/v
  `.view/.transpose`, the attention interface transformers selects, `o_proj`), and falls back to the
  original forward with a KV cache (generation).
The plain references are the modules' own original forwards (see tests/gpu and tests/kernels).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from loratune.kernels.lora_group import project_shared

LLAMA_RMSNORM_CLASSES = ("LlamaRMSNorm", "Qwen2RMSNorm", "MistralRMSNorm", "Qwen3RMSNorm")


# attention class -> how it passes its sliding window to the attention interface (Llama passes none)
ROPE_ATTENTION_CLASSES = {
    "LlamaAttention": lambda m: {},
    "Qwen2Attention": lambda m: {"sliding_window": m.sliding_window},
    "MistralAttention": lambda m: {"sliding_window": getattr(m.config, "sliding_window", None)},
}


def liger_available() -> bool:
    try:
        import liger_kernel.ops.rope  # noqa: F401
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
    """Llama-form RMSNorms with a frozen weight -> `norm_swiglu.rms_norm` (one kernel per direction)."""
    from loratune.kernels.norm_swiglu import rms_norm

    n = 0
    for m in model.modules():
        if not _is_llama_rmsnorm(m) or m.weight.requires_grad or getattr(m, "_loratune_fused", False):
            continue
        original = m.forward

        def forward(x: Tensor, m: nn.Module = m, original=original) -> Tensor:
            if m.weight.requires_grad:  # unfrozen after the swap (full fine-tuning): no dw here
                return original(x)
            return rms_norm(x, m.weight, m.variance_epsilon)

        m.forward = forward
        m._loratune_fused = True
        n += 1
    return n


def swap_swiglu_mlps(model: nn.Module) -> int:
    """`down(silu(gate(x)) * up(x))` MLPs -> the product through `norm_swiglu.silu_mul`."""
    from loratune.kernels.norm_swiglu import silu_mul

    n = 0
    for m in model.modules():
        if not _is_swiglu_mlp(m) or getattr(m, "_loratune_fused", False):
            continue

        def forward(x: Tensor, m: nn.Module = m) -> Tensor:
            gate, up = project_shared((m.gate_proj, m.up_proj), x)  # one node when both are fused LoRA layers
            return m.down_proj(silu_mul(gate, up, reuse_inputs=True))  # gate and up feed only this product

        m.forward = forward
        m._loratune_fused = True
        n += 1
    return n


def swap_attention_rope(model: nn.Module) -> int:
    import sys

    from liger_kernel.ops.rope import LigerRopeFunction

    n = 0
    for m in model.modules():
        extra_fn = ROPE_ATTENTION_CLASSES.get(type(m).__name__)
        if extra_fn is None or getattr(m, "_loratune_fused", False):
            continue
        home = sys.modules[type(m).__module__]  # the modeling file's own attention registry and eager path
        original = m.forward

        def forward(hidden_states: Tensor, position_embeddings=None, attention_mask=None,
                    m: nn.Module = m, original=original, home=home, extra_fn=extra_fn, **kwargs):
            # a KV cache (`cache` from transformers 5.24, `past_key_values` before): the original forward
            if any(kwargs.get(k) is not None for k in ("cache", "past_key_values")) or position_embeddings is None:
                return original(hidden_states, position_embeddings=position_embeddings,
                                attention_mask=attention_mask, **kwargs)
            kwargs = {k: v for k, v in kwargs.items() if k not in ("cache", "past_key_values")}
            input_shape = hidden_states.shape[:-1]
            hidden_shape = (*input_shape, -1, m.head_dim)
            q, k, v = (t.view(hidden_shape).transpose(1, 2)  # one node when all three are fused LoRA layers
                       for t in project_shared((m.q_proj, m.k_proj, m.v_proj), hidden_states))
            cos, sin = position_embeddings
            q, k = LigerRopeFunction.apply(q, k, cos, sin)
            attend = home.ALL_ATTENTION_FUNCTIONS.get_interface(m.config._attn_implementation,
                                                                home.eager_attention_forward)
            out, weights = attend(m, q, k, v, attention_mask, dropout=0.0 if not m.training else m.attention_dropout,
                                  scaling=m.scaling, **extra_fn(m), **kwargs)
            return m.o_proj(out.reshape(*input_shape, -1).contiguous()), weights

        m.forward = forward
        m._loratune_fused = True
        n += 1
    return n
