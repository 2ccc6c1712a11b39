"""NEFTune: uniform noise on the input embeddings during supervised fine-tuning (Jain et al. 2023).

Each embedding vector of a sample of L tokens (hidden size d) gets noise drawn uniformly from
[-1, 1]^d times alpha / sqrt(L d), in training only: evaluation, sample answers, chat and serve see the
embeddings as they are. The paper's alpha is 5 (also tried: 10, 15); `train.neftune_alpha` sets it, 0 turns
it off.

L is the length of the sample the token belongs to: one padded row's length (the reference code's
`input_embeds.size(1)`), or a padding-free stream's segment, found from the positions where they restart
at 0 (so samples laid end to end get the noise each would get alone). Computed on the device with fixed
shapes (no read back to the host).

Two places apply it: loratune's decoder calls `add_noise` on its embeddings (`Decoder.neftune_alpha`), and
the transformers fallback gets `NEFTuneHooks`: PyTorch forward hooks (public API, removed by `remove`) on
the model's backbone (to read the batch's `position_ids`; loratune's loss calls the backbone directly) and
on its input embedding module (to add the noise).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn


def token_lengths(positions: Tensor) -> Tensor:
    """For each token of a stream with `positions` [N] (restarting at 0 at each sample), its sample's length."""
    pos = positions.reshape(-1)
    starts = pos == 0
    starts[0] = True
    seg = torch.cumsum(starts.to(torch.int64), 0) - 1
    counts = torch.zeros(pos.numel(), dtype=torch.float32, device=pos.device)
    counts.scatter_add_(0, seg, torch.ones_like(counts))
    return counts[seg]


def add_noise(embeds: Tensor, lengths: Tensor, alpha: float, generator: torch.Generator | None = None) -> Tensor:
    """`embeds` [..., d] plus uniform noise of magnitude alpha / sqrt(L d) per token; `lengths` (broadcastable to
    embeds[..., 0]) holds each token's L."""
    d = embeds.shape[-1]
    scale = alpha / torch.sqrt(lengths.to(torch.float32) * d)
    noise = torch.rand(embeds.shape, dtype=torch.float32, device=embeds.device, generator=generator) * 2 - 1
    return embeds + (noise * scale.unsqueeze(-1)).to(embeds.dtype)


def magnitude(alpha: float, length: int, hidden: int) -> float:
    """The bound of each noise value for a sample of `length` tokens: alpha / sqrt(L d)."""
    return alpha / math.sqrt(length * hidden)


class NEFTuneHooks:
    """NEFTune on a transformers model: noise on `model.get_input_embeddings()`'s output while the embedding
    module is in training mode. A padding-free batch ([1, N] with `position_ids`) gets each segment's own length,
    a padded one ([B, T]) its row length T."""

    def __init__(self, model: nn.Module, alpha: float) -> None:
        self.alpha = alpha
        self.positions: Tensor | None = None
        base = model.get_base_model() if hasattr(model, "get_base_model") else model  # under peft's wrapper
        backbone = getattr(base, base.base_model_prefix)
        self.handles = [backbone.register_forward_pre_hook(self._read_positions, with_kwargs=True),
                        base.get_input_embeddings().register_forward_hook(self._noise)]

    def _read_positions(self, module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        self.positions = kwargs.get("position_ids")

    def _noise(self, module: nn.Module, args: tuple, output: Tensor) -> Tensor:
        if not module.training or self.alpha <= 0:
            return output
        pos = self.positions
        if pos is not None and pos.numel() == output.shape[:-1].numel():
            lengths = token_lengths(pos).reshape(output.shape[:-1])
        else:
            lengths = torch.full(output.shape[:-1], float(output.shape[-2]), device=output.device)
        return add_noise(output, lengths, self.alpha)

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []


def attach(module: nn.Module, alpha: float) -> NEFTuneHooks | None:
    """Turn NEFTune on for the model that trains: loratune's decoder (its own `neftune_alpha`) or a transformers
    model (hooks, returned). Nothing happens for alpha 0."""
    if alpha <= 0:
        return None
    if hasattr(module, "neftune_alpha"):
        module.neftune_alpha = float(alpha)
        return None
    return NEFTuneHooks(module, alpha)
