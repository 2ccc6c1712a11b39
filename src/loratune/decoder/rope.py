"""Rotary position embeddings: inverse frequencies per RoPE variant, cos/sin per token, and the rotation.

Why our own: the decoder must compute the same numbers whatever transformers version is installed, so the
variants are written out here from their definitions (the same formulas as transformers'
`ROPE_INIT_FUNCTIONS`, which the tests compare against): default, linear (position interpolation),
llama3 (Llama 3.1's wavelength-dependent scaling), yarn (NTK-by-parts + attention factor) and longrope
(Phi-3: per-dimension factors, the long set once a sample is longer than the pretraining length) and
dynamic NTK (the base theta grows with the sample's length beyond the pretraining length). Dynamic NTK is
decided per sample from its extent, as longrope's factors are: a sample gets what transformers computes
for it alone (transformers keeps the frequencies of the longest batch seen until a batch shorter than the
pretraining length comes, so there its result also depends on earlier batches).

Conventions (as in transformers): the first `rotary_dim` dims of each head rotate in two halves
(rotate_half); angles are computed in fp32 from the token's position, cos and sin are multiplied by the
attention factor and cast to the activations' dtype, the rotation runs in that dtype.
Tokens carry their own positions, so samples laid end to end each start at 0.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from loratune.decoder.config import RopeConfig


def _base_inv_freq(theta: float, dim: int) -> Tensor:
    return 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))


def _llama3(rc: RopeConfig, inv: Tensor) -> Tensor:
    old = rc.original_max_position
    low_wavelen, high_wavelen = old / rc.low_freq_factor, old / rc.high_freq_factor
    wavelen = 2 * math.pi / inv
    scaled = torch.where(wavelen > low_wavelen, inv / rc.factor, inv)
    smooth = (old / wavelen - rc.low_freq_factor) / (rc.high_freq_factor - rc.low_freq_factor)
    smoothed = (1 - smooth) * scaled / rc.factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
    return torch.where(medium, smoothed, scaled)


def _yarn(rc: RopeConfig) -> Tensor:
    dim, base = rc.rotary_dim, rc.theta

    def correction_dim(rotations: float) -> float:
        return (dim * math.log(rc.original_max_position / (rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(rc.beta_fast), correction_dim(rc.beta_slow)
    if rc.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # no zero-width ramp
    pos_freqs = base ** (torch.arange(0, dim, 2).float() / dim)
    extrapolation, interpolation = 1.0 / pos_freqs, 1.0 / (rc.factor * pos_freqs)
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    keep = 1 - ramp  # share of the unscaled (extrapolated) frequency
    return interpolation * (1 - keep) + extrapolation * keep


def _longrope(rc: RopeConfig, factors: tuple[float, ...]) -> Tensor:
    shape = torch.arange(0, rc.rotary_dim, 2, dtype=torch.int64).float() / rc.rotary_dim
    return 1.0 / (torch.tensor(factors, dtype=torch.float32) * rc.theta ** shape)


def dynamic_ntk(rc: RopeConfig, extent: Tensor) -> Tensor:
    """Dynamic NTK inverse frequencies [N, rotary_dim/2] for samples reaching `extent` [N] positions: the base
    becomes theta * (factor * L / original - (factor - 1)) ** (dim / (dim - 2)), L = max(extent, original),
    in fp32 as transformers computes it (so up to the pretraining length it is the plain RoPE)."""
    dim, old = rc.rotary_dim, rc.original_max_position
    exponent = torch.arange(0, dim, 2, dtype=torch.int64, device=extent.device).float() / dim
    lengths, which = torch.unique(torch.clamp_min(extent, old), return_inverse=True)
    # one row per distinct length, each computed as transformers does (a 0-d base): a batched pow may round
    # differently in its last bit, which positions in the thousands turn into visible cos/sin differences
    rows = []
    for length in lengths:
        base = rc.theta * ((rc.factor * length.float() / old) - (rc.factor - 1)) ** (dim / (dim - 2))
        rows.append(1.0 / (base ** exponent))
    return torch.stack(rows)[which]


def inverse_frequencies(rc: RopeConfig) -> tuple[Tensor, Tensor | None]:
    """(inv_freq [rotary_dim/2] fp32, and for longrope the long-context set, else None). For dynamic NTK
    these are the frequencies up to the pretraining length; longer samples get `dynamic_ntk`'s."""
    if rc.kind in ("default", "dynamic"):
        return _base_inv_freq(rc.theta, rc.rotary_dim), None
    if rc.kind == "linear":
        return _base_inv_freq(rc.theta, rc.rotary_dim) / rc.factor, None
    if rc.kind == "llama3":
        return _llama3(rc, _base_inv_freq(rc.theta, rc.rotary_dim)), None
    if rc.kind == "yarn":
        return _yarn(rc), None
    if rc.kind == "longrope":
        return _longrope(rc, rc.short_factor), _longrope(rc, rc.long_factor)
    raise ValueError(f"unknown RoPE kind {rc.kind!r}")  # config.py admits only the kinds above


class Rotary(nn.Module):
    """cos/sin [N, rotary_dim] for N tokens from their positions (one instance per distinct RopeConfig)."""

    def __init__(self, rc: RopeConfig, device: torch.device | None = None) -> None:
        super().__init__()
        self.rc = rc
        inv, long = inverse_frequencies(rc)
        self.register_buffer("inv_freq", inv.to(device), persistent=False)
        self.register_buffer("long_inv_freq", None if long is None else long.to(device), persistent=False)

    @property
    def needs_extent(self) -> bool:
        """The frequencies depend on each sample's length (longrope, dynamic NTK)."""
        return self.long_inv_freq is not None or self.rc.kind == "dynamic"

    def forward(self, positions: Tensor, dtype: torch.dtype, extent: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """`positions` [N] (int); `extent` [N]: one past the last position of each token's sample, needed by
        longrope, whose long factors apply to a sample longer than the pretraining length (decided per
        sample, so samples laid end to end get what each gets alone), and by dynamic NTK."""
        inv = self.inv_freq
        if self.needs_extent and extent is None:
            raise ValueError(f"{self.rc.kind} RoPE needs each token's sample extent")
        if self.long_inv_freq is not None:
            long = (extent > self.rc.original_max_position)[:, None]
            inv = torch.where(long, self.long_inv_freq[None, :], inv[None, :])
        elif self.rc.kind == "dynamic":
            inv = dynamic_ntk(self.rc, extent)
        freqs = positions.float()[:, None] * inv
        emb = torch.cat((freqs, freqs), dim=-1)
        scale = self.rc.attention_factor
        return (emb.cos() * scale).to(dtype), (emb.sin() * scale).to(dtype)


def _rotate_half(x: Tensor) -> Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate x [N, heads, head_dim] by cos/sin [N, rotary_dim]; dims past rotary_dim pass through."""
    cos, sin = cos[:, None, :], sin[:, None, :]
    r = cos.shape[-1]
    if r == x.shape[-1]:
        return x * cos + _rotate_half(x) * sin
    rot, rest = x[..., :r], x[..., r:]
    return torch.cat((rot * cos + _rotate_half(rot) * sin, rest), dim=-1)
