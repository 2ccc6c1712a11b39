"""Causal-LM loss as a *sum* over supervised tokens, computed without ever holding the full logits.

The loop divides by the number of supervised tokens in the whole accumulation window, so that batch
8 x accumulation 1 and batch 1 x accumulation 8 give the same gradient; that is why this returns a sum.

Memory: for a 128k vocabulary the logits of 2 x 2048 tokens are 1 GiB in bf16 and 2 GiB more in fp32,
which is what the usual path holds, several times over. Here the backbone returns hidden states, the
rows that predict nothing (prompt tokens under assistant-only loss, padding) are dropped before the
head, and the head + cross-entropy run through `loratune.kernels.loss.fused_linear_cross_entropy_sum`:
row chunks whose gradient is computed in the forward pass, so at most one chunk of logits exists and
nothing is recomputed. This is the loss of every run, on every device. `full_logits_loss_sum` is the
plain reference (the model's own forward to full logits) that tests compare against.

Two model codes, one loss: `lm_loss_sum` for the transformers (+ peft) model, `decoder_loss_sum` for
loratune's decoder, whose token stream carries its sample boundaries. The targets are the same: each
position predicts the next label of its row (a stream is one row whose samples begin with label -100, so
no position predicts the first token of the next sample).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from loratune.decoder.attention import Boundaries
from loratune.decoder.model import Decoder
from loratune.kernels.loss import fused_linear_cross_entropy_sum

IGNORE = -100


def shift_labels(labels: torch.Tensor) -> torch.Tensor:
    """Targets aligned with positions: position t predicts token t+1; the last position predicts nothing."""
    return F.pad(labels[..., 1:], (0, 1), value=IGNORE)


def count_targets(labels: torch.Tensor) -> int:
    return int((shift_labels(labels) != IGNORE).sum())


def unwrap_model(model: nn.Module) -> nn.Module:
    """The transformers model under peft / accelerate wrappers."""
    while True:
        if hasattr(model, "get_base_model"):
            model = model.get_base_model()
        elif hasattr(model, "module") and isinstance(model.module, nn.Module):
            model = model.module
        else:
            return model


_unwrap = unwrap_model


TARGET_ROWS = "target_rows"  # batch key: flat indices of the positions that predict a supervised token


def supervised_rows(labels: torch.Tensor) -> torch.Tensor:
    """Flat indices of the positions that predict a supervised token (computed on the labels' device)."""
    return (shift_labels(labels).reshape(-1) != IGNORE).nonzero().squeeze(1)


def with_target_rows(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The batch plus `target_rows`, computed where the labels are (the host, before the batch moves to the
    GPU), so that the loss can drop unsupervised rows without waiting for the GPU to count them."""
    return {**batch, TARGET_ROWS: supervised_rows(batch["labels"])}


def hidden_states(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Final hidden states from the model's backbone (adapters included: peft injects them in place)."""
    base = _unwrap(model)
    backbone = getattr(base, base.base_model_prefix)
    inputs = {k: v for k, v in batch.items() if k not in ("labels", TARGET_ROWS)}
    return backbone(**inputs, use_cache=False).last_hidden_state


def _head_has_bias(model: nn.Module) -> bool:
    return getattr(_unwrap(model).get_output_embeddings(), "bias", None) is not None


def _head_loss_sum(model: nn.Module, batch: dict[str, torch.Tensor], rows: torch.Tensor | None, impl: str) -> torch.Tensor:
    """The summed loss of the rows `rows` (None: every row) through the chunked head + cross-entropy."""
    base = _unwrap(model)
    hidden = hidden_states(model, batch)
    targets = shift_labels(batch["labels"]).reshape(-1)
    h = hidden.reshape(-1, hidden.shape[-1])
    if rows is not None and rows.numel() != targets.numel():  # rows with no target: dropped before the head
        h, targets = h.index_select(0, rows), targets.index_select(0, rows)
    cap = getattr(base.config, "final_logit_softcapping", None)
    loss, _ = fused_linear_cross_entropy_sum(h, base.get_output_embeddings().weight, targets, softcap=cap, impl=impl)
    return loss


def lm_loss_sum(model: nn.Module, batch: dict[str, torch.Tensor], impl: str = "chunked") -> tuple[torch.Tensor, int]:
    """(summed token loss, number of supervised tokens) for one micro-batch.

    `impl`: `chunked` (ours, any device) or `liger` (liger-kernel's fused linear cross-entropy, CUDA;
    kept for comparison in benchmarks/bench_train.py).
    """
    if _head_has_bias(model):  # rare (some GPT-style heads): the plain path
        return full_logits_loss_sum(model, batch)
    rows = batch.get(TARGET_ROWS)
    if rows is None:  # rows counted here: the host waits for the labels' comparison on the device
        rows = supervised_rows(batch["labels"])
    return _head_loss_sum(model, batch, rows, impl), rows.numel()


def full_logits_loss_sum(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """Reference: the model's own forward to full logits, then summed cross-entropy in fp32."""
    inputs = {k: v for k, v in batch.items() if k not in ("labels", TARGET_ROWS)}
    logits = model(**inputs, use_cache=False).logits
    logits = logits if logits.dtype in (torch.float32, torch.float64) else logits.float()
    targets = shift_labels(batch["labels"])
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1),
                           ignore_index=IGNORE, reduction="sum")
    return loss, int((targets != IGNORE).sum())


def decoder_loss_sum(decoder: Decoder, input_ids: torch.Tensor, boundaries: Boundaries, labels: torch.Tensor,
                     rows: torch.Tensor | None = None,
                     inputs_embeds: torch.Tensor | None = None) -> tuple[torch.Tensor, int]:
    """(summed token loss, supervised tokens) of loratune's decoder on a stream of samples.

    `input_ids`/`labels`: [1, N] (or [B, T], each row one sample of T tokens, right-padded), laid out as
    `boundaries` says; `rows`: the flat indices `supervised_rows(labels)` gives (computed here if None);
    `inputs_embeds`: the embedded ids, made by the caller (an input embedding in host memory)."""
    if rows is None:
        rows = supervised_rows(labels)
    hidden = decoder.hidden_states(input_ids.reshape(-1), boundaries, inputs_embeds=inputs_embeds)
    targets = shift_labels(labels).reshape(-1)
    if rows.numel() != targets.numel():  # rows with no target: dropped before the head
        hidden, targets = hidden.index_select(0, rows), targets.index_select(0, rows)
    loss, _ = fused_linear_cross_entropy_sum(hidden, decoder.head.weight, targets, softcap=decoder.head.softcap,
                                             triton=decoder.kernels)
    return loss, rows.numel()


def decoder_full_logits_loss_sum(decoder: Decoder, input_ids: torch.Tensor, boundaries: Boundaries,
                                 labels: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Reference: the decoder's full logits, then summed cross-entropy in fp32."""
    logits = decoder(input_ids.reshape(-1), boundaries).float()
    targets = shift_labels(labels).reshape(-1)
    loss = F.cross_entropy(logits, targets, ignore_index=IGNORE, reduction="sum")
    return loss, int((targets != IGNORE).sum())
