"""Causal-LM loss as a *sum* over supervised tokens, computed without holding the full logits.

The loop divides by the number of supervised tokens in the whole accumulation window, so that batch
8 x accumulation 1 and batch 1 x accumulation 8 give the same gradient; that is why this returns a sum.

Memory: for a 128k vocabulary the logits of 2 x 2048 tokens are 1 GiB in bf16 and 2 GiB more in fp32,
which is what HF's default path holds. Here the backbone returns hidden states and the head is applied
in row chunks under activation checkpointing, so at most one chunk of logits exists at a time, in the
forward and again in the backward (recomputed). `full_logits_loss_sum` is the plain reference.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

IGNORE = -100
CHUNK_ROWS = 2048


def shift_labels(labels: torch.Tensor) -> torch.Tensor:
    """Targets aligned with positions: position t predicts token t+1; the last position predicts nothing."""
    return F.pad(labels[:, 1:], (0, 1), value=IGNORE)


def count_targets(labels: torch.Tensor) -> int:
    return int((shift_labels(labels) != IGNORE).sum())


def _softcap(logits: torch.Tensor, cap: float | None) -> torch.Tensor:
    return logits if not cap else torch.tanh(logits / cap) * cap


def _at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    """Cross-entropy over a large vocabulary needs fp32: bf16 logits lose the small probabilities."""
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def _chunk_ce_sum(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, cap: float | None) -> torch.Tensor:
    logits = _softcap(_at_least_fp32(F.linear(h, weight)), cap)
    return F.cross_entropy(logits, targets, ignore_index=IGNORE, reduction="sum")


def chunked_linear_ce_sum(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                          softcap: float | None = None, chunk_rows: int = CHUNK_ROWS) -> torch.Tensor:
    """sum CE(hidden @ weight.T, targets) over targets != -100, one row chunk of logits at a time."""
    h = hidden.reshape(-1, hidden.shape[-1])
    t = targets.reshape(-1)
    keep = t != IGNORE  # rows with no target cost nothing: drop them before the head matmul
    h, t = h[keep], t[keep]
    total = _at_least_fp32(h.sum() * 0)  # zero that keeps the graph when no row has a target
    for start in range(0, h.shape[0], chunk_rows):
        hc, tc = h[start:start + chunk_rows], t[start:start + chunk_rows]
        if torch.is_grad_enabled():
            part = checkpoint(_chunk_ce_sum, hc, weight, tc, softcap, use_reentrant=False)
        else:
            part = _chunk_ce_sum(hc, weight, tc, softcap)
        total = total + part
    return total


def _unwrap(model: nn.Module) -> nn.Module:
    """The transformers model under peft / accelerate wrappers."""
    while True:
        if hasattr(model, "get_base_model"):
            model = model.get_base_model()
        elif hasattr(model, "module") and isinstance(model.module, nn.Module):
            model = model.module
        else:
            return model


def hidden_states(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Final hidden states from the model's backbone (adapters included: peft injects them in place)."""
    base = _unwrap(model)
    backbone = getattr(base, base.base_model_prefix)
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    return backbone(**inputs, use_cache=False).last_hidden_state


def lm_loss_sum(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """(summed token loss, number of supervised tokens) for one micro-batch."""
    base = _unwrap(model)
    hidden = hidden_states(model, batch)
    targets = shift_labels(batch["labels"])
    head = base.get_output_embeddings()
    cap = getattr(base.config, "final_logit_softcapping", None)
    loss = chunked_linear_ce_sum(hidden, head.weight, targets, softcap=cap)
    if head.bias is not None:  # rare (e.g. some GPT-style heads): fall back to full logits
        return full_logits_loss_sum(model, batch)
    return loss, int((targets != IGNORE).sum())


def full_logits_loss_sum(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """Reference: the model's own forward to full logits, then summed cross-entropy in fp32."""
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    logits = _at_least_fp32(model(**inputs, use_cache=False).logits)
    targets = shift_labels(batch["labels"])
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1),
                           ignore_index=IGNORE, reduction="sum")
    return loss, int((targets != IGNORE).sum())
