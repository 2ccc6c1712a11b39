"""Per-sequence log-probabilities of the supervised tokens, through a chunked head: the full logits never held.

Preference losses are non-linear in each completion's summed log-probability, so the SFT path's trick (the
gradient of a plain token sum computed inside the forward pass, `loratune.kernels.loss`) does not apply.
Here the supervised rows go through the output head in chunks of `CHUNK_ELEMENTS` logits, each under
activation checkpointing: the forward pass keeps only each row's log-probability, and the backward pass
recomputes one chunk's logits at a time. Memory is one chunk of logits; the cost is one more head matmul
per chunk, which is small next to the model.

`segments` tells, from the host-side batch, which supervised row belongs to which sequence: a batch of
preference samples always carries `position_ids` (a stream, or padded packed rows), a sequence starts
wherever they restart at 0, and the sequences that have at least one supervised token are numbered in order
(padding segments have none). Computed on the host, so the device is never waited for.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from loratune.kernels.loss import CHUNK_ELEMENTS
from loratune.train.loss import IGNORE, shift_labels


def _chunk_logps(hidden: Tensor, weight: Tensor, targets: Tensor, softcap: float | None) -> Tensor:
    logits = hidden.to(weight.dtype) @ weight.t()
    logits = logits if logits.dtype in (torch.float32, torch.float64) else logits.float()
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    picked = logits.gather(1, targets[:, None]).squeeze(1)
    return picked - torch.logsumexp(logits, dim=-1)


def token_logps(hidden: Tensor, weight: Tensor, targets: Tensor, softcap: float | None = None,
                chunk_elements: int = CHUNK_ELEMENTS) -> Tensor:
    """log p(target) of each row: hidden [R, H], weight [V, H], targets [R] -> [R] (fp32 or fp64)."""
    rows = max(1, min(hidden.shape[0], chunk_elements // max(weight.shape[0], 1)))
    grad = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    out = []
    for start in range(0, hidden.shape[0], rows):
        args = (hidden[start:start + rows], weight, targets[start:start + rows], softcap)
        out.append(checkpoint(_chunk_logps, *args, use_reentrant=False) if grad else _chunk_logps(*args))
    if not out:
        return hidden.new_zeros(0, dtype=torch.float32)
    return torch.cat(out)


def segments(batch: dict[str, Tensor]) -> tuple[Tensor, Tensor, Tensor]:
    """(flat indices of the supervised rows, their sequence number, supervised tokens per sequence), on the host.

    Sequences without a supervised token (padding) are not numbered."""
    labels = batch["labels"]
    targets = shift_labels(labels).reshape(-1)
    rows = (targets != IGNORE).nonzero().squeeze(1)
    if "position_ids" in batch:
        starts = batch["position_ids"].reshape(-1) == 0
    else:  # plain padded rows: one sequence per row
        starts = torch.zeros(labels.numel(), dtype=torch.bool)
        starts[::labels.shape[-1]] = True
    starts[0] = True
    seg = torch.cumsum(starts.long(), 0) - 1
    raw = seg.index_select(0, rows)
    kept, number = torch.unique_consecutive(raw, return_inverse=True)
    counts = torch.bincount(number, minlength=kept.numel())
    return rows, number, counts


def sequence_logps(hidden: Tensor, weight: Tensor, labels: Tensor, rows: Tensor, number: Tensor, n_seq: int,
                   softcap: float | None = None) -> Tensor:
    """Summed log-probability of each numbered sequence's supervised tokens: hidden [N, H] (flat, N = the
    batch's positions), labels as the batch has them (unshifted) -> [n_seq]."""
    targets = shift_labels(labels).reshape(-1).index_select(0, rows)
    lp = token_logps(hidden.index_select(0, rows), weight, targets, softcap)
    return lp.new_zeros(n_seq).index_add(0, number, lp)
