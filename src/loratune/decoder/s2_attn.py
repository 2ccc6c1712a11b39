"""Shifted sparse attention (S²-Attn, LongLoRA: Chen et al. 2023) over padding-free streams, for training only.

LongLoRA trains long contexts with attention restricted to groups of G tokens (G a fraction of the sample
length; the paper uses 1/4): the first half of the heads attend (causally) within groups [0, G), [G, 2G), ...;
the other half see the groups shifted by G/2, so information flows from one group to the next. Evaluation and
inference keep full causal attention (the model trained this way is used unchanged with it).

Here each sample of the stream (`Boundaries`) is split on its own: G = `group` x its length when `group` <= 1
(a fraction), or `group` tokens when > 1. A sample of at most G tokens attends with plain causal attention.
The shifted heads' groups start at G/2, 3G/2, ... within the sample; unlike the paper's reference code, which
rolls the tokens and so lets the first G/2 tokens see the sample's last ones, the first G/2 tokens form a group
of their own (nothing is seen from the future).

Each token gets two group ids (unshifted, shifted), the stream index of its group's first token, so equal ids
mean same sample and same group; computed on the device from the positions (no read back to the host). Two
masks from them: FlexAttention's block mask (`mask_mod`, blocks outside every group skipped) on CUDA, and a
dense boolean [H, N, N] mask for the SDPA reference path elsewhere. The caller (`Decoder.hidden_states`) makes
one `S2Groups` per training forward pass and builds its masks before the layers run (as `attention.prepare`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from loratune.decoder.attention import FLEX_MIN_TOKENS, Boundaries, dense_attention, flex_available
from loratune.errors import ConfigError


def check_group(group: float) -> None:
    """A fraction in (0, 1] of the sample length, or a whole number of tokens >= 2."""
    if not (0 < group <= 1 or (group > 1 and float(group).is_integer())):
        raise ConfigError(f"train.s2_attn_group must be a fraction in (0, 1] of the sample length or a whole number "
                          f"of tokens >= 2, got {group}")


def attach(module: torch.nn.Module, group: float) -> None:
    """Turn S²-Attn on for loratune's decoder `module` (training mode only); anything else is refused."""
    check_group(group)
    if not hasattr(module, "s2_group"):
        raise ConfigError(f"train.s2_attn needs loratune's decoder; the model that trains is a {type(module).__name__}")
    module.s2_group = float(group)


def group_ids(positions: Tensor, group: float) -> tuple[Tensor, Tensor]:
    """(unshifted, shifted) group ids [N] of a stream whose `positions` restart at 0 at each sample: the stream
    index of the first token of each token's group."""
    check_group(group)
    pos = positions.reshape(-1).long()
    n = pos.numel()
    idx = torch.arange(n, device=pos.device)
    first = pos == 0
    first[0] = True
    seg = torch.cumsum(first.long(), 0) - 1
    lengths = torch.zeros(n, dtype=torch.long, device=pos.device).scatter_add_(0, seg, torch.ones_like(pos))[seg]
    start = idx - pos
    if group <= 1:
        size = (lengths.double() * group).floor().long().clamp_min(1)
    else:
        size = torch.full_like(pos, int(group))
    split = lengths > size
    half = size // 2
    g0 = torch.where(split, start + (pos // size) * size, start)
    shifted = ((pos - half).clamp_min(0) // size) * size + half  # groups [half, half + size), ...
    g1 = torch.where(split & (pos >= half), start + shifted, start)
    return g0, g1


@dataclass(eq=False)
class S2Groups:
    """The groups of one stream under S²-Attn for `num_heads` query heads (heads >= num_heads // 2 shifted),
    and the masks made from them (kept for the forward pass's layers and their recomputation)."""

    g0: Tensor
    g1: Tensor
    num_heads: int
    _masks: dict = field(default_factory=dict, repr=False)

    @classmethod
    def build(cls, b: Boundaries, group: float, num_heads: int) -> S2Groups:
        if any(b.offsets):
            raise ConfigError("S²-Attn is for training streams; it does not continue a KV cache")
        g0, g1 = group_ids(b.positions, group)
        return cls(g0, g1, num_heads)

    @property
    def n_tokens(self) -> int:
        return self.g0.numel()

    def dense_mask(self, window: int | None) -> Tensor:
        """[H, N, N] bool: True where query i of head h may attend to key j (same group of that head's layout,
        j <= i, i - j < window)."""
        key = ("dense", window)
        if key not in self._masks:
            i = torch.arange(self.n_tokens, device=self.g0.device)
            causal = i[None, :] <= i[:, None]
            if window is not None:
                causal = causal & ((i[:, None] - i[None, :]) < window)
            both = torch.stack([(g[:, None] == g[None, :]) & causal for g in (self.g0, self.g1)])
            shifted = (torch.arange(self.num_heads, device=self.g0.device) >= self.num_heads // 2).long()
            self._masks[key] = both[shifted]
        return self._masks[key]

    def mask_mod(self, window: int | None):
        """FlexAttention's mask_mod of `dense_mask`."""
        g0, g1, half = self.g0, self.g1, self.num_heads // 2

        def s2(b, h, q, k):
            shifted = h >= half
            same = ((g0[q] == g0[k]) & ~shifted) | ((g1[q] == g1[k]) & shifted)
            return same & (k <= q)

        def s2_windowed(b, h, q, k):
            return s2(b, h, q, k) & (q - k < window)

        return s2 if window is None else s2_windowed

    def block_mask(self, window: int | None):
        """FlexAttention's block mask of `dense_mask` (per head: the two halves differ)."""
        key = ("flex", window)
        if key not in self._masks:
            from torch.nn.attention.flex_attention import create_block_mask

            n = self.n_tokens
            self._masks[key] = create_block_mask(self.mask_mod(window), None, self.num_heads, n, n,
                                                 device=self.g0.device)
        return self._masks[key]


def s2_path(s2: S2Groups, backend: str, device: torch.device) -> str:
    """`flex` (CUDA, FlexAttention present, a stream of at least FLEX_MIN_TOKENS) or `sdpa` (the dense mask)."""
    use_flex = (backend in ("flex", "flash") and device.type == "cuda" and flex_available()
                and s2.n_tokens >= FLEX_MIN_TOKENS)
    return "flex" if use_flex else "sdpa"


def prepare_s2(s2: S2Groups, windows, backend: str, device: torch.device) -> None:
    """Build the masks the layers will read, before they run (no mask first built inside a checkpointed block)."""
    for window in dict.fromkeys(windows):
        if s2_path(s2, backend, device) == "flex":
            s2.block_mask(window)
        else:
            s2.dense_mask(window)


def s2_attend(q: Tensor, k: Tensor, v: Tensor, s2: S2Groups, *, scale: float, window: int | None = None,
              softcap: float | None = None, dropout: float = 0.0, backend: str = "sdpa") -> Tensor:
    """S²-Attn over the stream: q [N, H, D], k/v [N, H_kv, D] -> [N, H, D]."""
    if q.shape[1] != s2.num_heads:
        raise ValueError(f"S²-Attn groups made for {s2.num_heads} heads, the query has {q.shape[1]}")
    qh, kh, vh = (t.transpose(0, 1)[None] for t in (q, k, v))  # [1, heads, N, D]
    if s2_path(s2, backend, q.device) == "sdpa":
        out = dense_attention(qh, kh, vh, s2.dense_mask(window)[None], scale, softcap, dropout)
        return out[0].transpose(0, 1)
    from loratune.decoder.attention import _compiled_flex, _recompile_budget, softcap_mod

    if dropout:
        raise ConfigError("attention dropout is not available with S²-Attn on FlexAttention")
    score_mod = softcap_mod(softcap, q.device)
    with _recompile_budget():
        out = _compiled_flex()(qh, kh, vh, score_mod=score_mod, block_mask=s2.block_mask(window), scale=scale,
                               enable_gqa=q.shape[1] != k.shape[1])
    return out[0].transpose(0, 1)
