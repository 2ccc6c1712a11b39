"""Causal attention over samples laid end to end, with the sequence boundaries given by the caller.

A micro-batch is one stream of N tokens holding several samples back to back (no padding). `Boundaries`
carries where each sample starts (`cu_seqlens`, as flash attention takes it) and each token's position
inside its sample; no token ever attends to a token of another sample. Three implementations, one answer:

- `sdpa` (the reference, and the CPU path): PyTorch's scaled_dot_product_attention over the whole stream
  with a block-diagonal causal mask [N, N] (plus the sliding window). With a logit soft-cap (Gemma 2),
  which SDPA cannot apply, the same mask on the plain product/softmax path, as transformers' eager path
  computes it. Memory grows with N^2: meant for CPU and tests, and as the fallback. When the stream holds
  several samples and 2 S L^2 <= N^2 (S samples, the longest of L tokens), the samples are gathered into S
  rows of L (`Boundaries.padded_layout`) and attend there instead, under a causal mask that also hides
  each row's padding: the same result for a fraction of the work (a micro-batch of many short samples).
- `flash`: `flash_attn.flash_attn_varlen_func` with `cu_seqlens` (window and soft-cap native), when the
  flash-attn package is installed, on CUDA in 16-bit.
- `flex`: PyTorch's FlexAttention with a block mask built from the sample ids (blocks that cross samples
  are skipped, not computed and masked); compiled on CUDA, the unfused reference implementation elsewhere.
`auto` picks flash, then flex on CUDA, else sdpa. Whatever the choice, samples of one length (padded rows,
a single sample) attend through SDPA's causal kernel as rows [S, heads, L, D]: exact, and the fastest. All take q [N, H, D] and k, v [N, H_kv, D] (grouped-query
attention: H a multiple of H_kv) and return [N, H, D]. A sliding window of w keeps keys with q - k < w.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from loratune.errors import ConfigError

Backend = Literal["auto", "sdpa", "flash", "flex"]
BACKENDS = ("auto", "sdpa", "flash", "flex")


@dataclass(frozen=True, eq=False)
class Boundaries:
    """Where the samples of a token stream begin and end, and each token's position in its sample.

    `lengths` lives on the host (the SDPA reference, the KV cache and the flash call's max_seqlen need it
    there); the tensors live on the device. Masks derived from it are kept for the forward pass's layers.
    """

    lengths: tuple[int, ...]
    cu_seqlens: Tensor | None  # int32 [S + 1] (None: made on the device, `on_device`)
    positions: Tensor  # int64 [N]
    sample_ids: Tensor  # int64 [N]
    max_seqlen: int
    offsets: tuple[int, ...] = ()  # tokens already in the KV cache per sample (positions start there)
    _derived: dict = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def from_lengths(cls, lengths: list[int] | tuple[int, ...], device: torch.device | str | None = None,
                     offsets: list[int] | tuple[int, ...] | None = None) -> Boundaries:
        """Samples of `lengths` tokens laid end to end; positions start at `offsets` (default 0)."""
        lengths = tuple(int(n) for n in lengths)
        offsets = tuple(int(o) for o in offsets) if offsets is not None else (0,) * len(lengths)
        if not lengths or min(lengths) < 1 or len(offsets) != len(lengths) or min(offsets) < 0:
            raise ValueError(f"sample lengths must be >= 1 (and offsets >= 0, one per sample): {lengths}, {offsets}")
        n = torch.tensor(lengths, dtype=torch.int64)
        cu = torch.zeros(len(lengths) + 1, dtype=torch.int32)
        cu[1:] = torch.cumsum(n, 0)
        ids = torch.repeat_interleave(torch.arange(len(lengths)), n)
        starts = cu[:-1].long()[ids]
        positions = torch.arange(int(cu[-1])) - starts + torch.tensor(offsets, dtype=torch.int64)[ids]
        return cls(lengths, cu.to(device), positions.to(device), ids.to(device), max(lengths), offsets)

    @classmethod
    def from_position_ids(cls, position_ids: Tensor) -> Boundaries:
        """Samples found where the positions do not continue by +1 (packed [1, N] or [N] position ids, as
        transformers reads them); reads the positions on the host once."""
        pos = position_ids.reshape(-1).tolist()
        starts = [i for i, p in enumerate(pos) if i == 0 or p != pos[i - 1] + 1]
        ends = starts[1:] + [len(pos)]
        return cls.from_lengths([e - s for s, e in zip(starts, ends)], position_ids.device,
                                offsets=[pos[s] for s in starts])

    @classmethod
    def on_device(cls, position_ids: Tensor) -> Boundaries:
        """Samples found where the positions restart at 0, computed where the positions are, with nothing read
        back to the host (a CUDA graph can capture it, and replays it for any stream of the same length).
        Without host lengths, such boundaries attend through FlexAttention (or the dense reference path)."""
        pos = position_ids.reshape(-1).long()
        ids = (torch.cumsum((pos == 0).long(), 0) - 1).clamp_min(0)
        return cls((), None, pos, ids, pos.numel())

    @property
    def device_only(self) -> bool:
        """Made by `on_device`: the sample lengths are not known on the host."""
        return not self.lengths

    @property
    def n_tokens(self) -> int:
        return self.positions.numel() if self.device_only else int(sum(self.lengths))

    def extent(self) -> Tensor:
        """Per token: one past the last position of its sample (longrope's choice of factors)."""
        if self.device_only:
            raise ValueError("boundaries made on the device carry no sample lengths for longrope's extent")
        if "extent" not in self._derived:
            ends = torch.tensor([o + n for o, n in zip(self.offsets, self.lengths)], device=self.positions.device)
            self._derived["extent"] = ends[self.sample_ids]
        return self._derived["extent"]

    def dense_mask(self, window: int | None) -> Tensor:
        """[N, N] bool, True where query i may attend to key j: same sample, j <= i, i - j < window."""
        key = ("dense", window)
        if key not in self._derived:
            i = torch.arange(self.n_tokens, device=self.positions.device)
            mask = (self.sample_ids[:, None] == self.sample_ids[None, :]) & (i[None, :] <= i[:, None])
            if window is not None:
                mask &= (i[:, None] - i[None, :]) < window
            self._derived[key] = mask
        return self._derived[key]

    def padded_layout(self) -> tuple[Tensor, Tensor]:
        """([S, L] stream index of each sample's tokens, 0 past its end; [S, L] True where a token is), L the
        longest sample: the samples as padded rows (`_sdpa_rows`)."""
        if "rows" not in self._derived:
            device = self.positions.device
            lengths = torch.tensor(self.lengths, device=device)
            cols = torch.arange(self.max_seqlen, device=device)
            valid = cols[None, :] < lengths[:, None]
            starts = torch.tensor([0, *self.lengths[:-1]], device=device).cumsum(0)
            self._derived["rows"] = ((starts[:, None] + cols[None, :]).masked_fill(~valid, 0), valid)
        return self._derived["rows"]

    def padded_mask(self, window: int | None) -> Tensor:
        """[S, 1, L, L] bool of `padded_layout`'s rows: causal, within the window, keys that exist (a padding
        query: the row's first key only)."""
        key = ("rows", window)
        if key not in self._derived:
            _, valid = self.padded_layout()
            i = torch.arange(self.max_seqlen, device=valid.device)
            mask = i[None, :] <= i[:, None]
            if window is not None:
                mask = mask & ((i[:, None] - i[None, :]) < window)
            mask = mask[None] & valid[:, None, :]
            # a padding query keeps its row's first key: no row is fully masked (NaN in some kernels); its
            # output is dropped, so it passes no gradient
            mask = mask | ((~valid)[:, :, None] & (i == 0)[None, None, :])
            self._derived[key] = mask[:, None]
        return self._derived[key]

    def block_mask(self, window: int | None):
        """FlexAttention's block mask of `dense_mask` (built once per batch and window)."""
        key = ("flex", window)
        if key not in self._derived:
            from torch.nn.attention.flex_attention import create_block_mask

            ids = self.sample_ids

            def causal(b, h, q, k):
                return (ids[q] == ids[k]) & (k <= q)

            def windowed(b, h, q, k):
                return (ids[q] == ids[k]) & (k <= q) & (q - k < window)

            n = self.n_tokens
            self._derived[key] = create_block_mask(causal if window is None else windowed, None, None, n, n,
                                                   device=self.positions.device)
        return self._derived[key]


# ------------------------------------------------------------------------------------------ dense paths


def _repeat_kv(x: Tensor, groups: int) -> Tensor:
    """[B, H_kv, L, D] -> [B, H_kv * groups, L, D], each kv head repeated for its query heads."""
    if groups == 1:
        return x
    b, h, n, d = x.shape
    return x[:, :, None].expand(b, h, groups, n, d).reshape(b, h * groups, n, d)


def dense_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor, scale: float, softcap: float | None = None,
                    dropout: float = 0.0) -> Tensor:
    """q [B, H, Lq, D], k/v [B, H_kv, Lk, D], mask bool broadcastable to [B, H, Lq, Lk] -> [B, H, Lq, D].

    SDPA when there is no soft-cap; with one, the product/soft-cap/mask/softmax(fp32) path of transformers'
    eager attention."""
    groups = q.shape[1] // k.shape[1]
    if softcap is None:
        if groups > 1 and q.is_cuda:
            # SDPA takes grouped heads (enable_gqa) only in its flash and math kernels, and flash takes no mask:
            # with a mask that would be the math kernel; repeated heads keep the memory-efficient one
            k, v, groups = _repeat_kv(k, groups), _repeat_kv(v, groups), 1
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, scale=scale,
                                              enable_gqa=groups > 1)
    k, v = _repeat_kv(k, groups), _repeat_kv(v, groups)
    w = torch.matmul(q, k.transpose(2, 3)) * scale
    w = torch.tanh(w / softcap) * softcap
    w = w.masked_fill(~mask, torch.finfo(w.dtype).min)
    w = F.softmax(w, dim=-1, dtype=torch.float32).to(q.dtype)
    if dropout:
        w = F.dropout(w, p=dropout)
    return torch.matmul(w, v)


def _sdpa_rows(q: Tensor, k: Tensor, v: Tensor, b: Boundaries, scale: float, window: int | None,
               softcap: float | None, dropout: float) -> Tensor:
    """The samples gathered into padded rows [S, heads, L, D], attended there, and taken back to the stream.
    Padding rows and columns are masked (every query keeps its own first key), so they add exact zeros to the
    gradients of the tokens they were gathered from."""
    index, valid = b.padded_layout()
    qr, kr, vr = (t[index].transpose(1, 2) for t in (q, k, v))  # [S, heads, L, D]
    out = dense_attention(qr, kr, vr, b.padded_mask(window), scale, softcap, dropout)
    return out.transpose(1, 2)[valid]


def _rows_pay(b: Boundaries) -> bool:
    """The SDPA path attends in padded rows (`_sdpa_rows`): lengths known, and at least half the work saved."""
    return not b.device_only and 2 * len(b.lengths) * b.max_seqlen ** 2 <= b.n_tokens ** 2


def _sdpa(q: Tensor, k: Tensor, v: Tensor, b: Boundaries, scale: float, window: int | None,
          softcap: float | None, dropout: float) -> Tensor:
    if _rows_pay(b):
        return _sdpa_rows(q, k, v, b, scale, window, softcap, dropout)
    qh, kh, vh = (t.transpose(0, 1)[None] for t in (q, k, v))  # [1, heads, N, D]
    out = dense_attention(qh, kh, vh, b.dense_mask(window)[None, None], scale, softcap, dropout)
    return out[0].transpose(0, 1)


# ------------------------------------------------------------------------------------------ fast paths


@functools.lru_cache(maxsize=1)
def flash_available() -> bool:
    try:
        from flash_attn import flash_attn_varlen_func  # noqa: F401
    except ImportError:
        return False
    return True


@functools.lru_cache(maxsize=1)
def flex_available() -> bool:
    try:
        from torch.nn.attention.flex_attention import flex_attention  # noqa: F401
    except ImportError:
        return False
    return True


def _flash(q: Tensor, k: Tensor, v: Tensor, b: Boundaries, scale: float, window: int | None,
           softcap: float | None, dropout: float) -> Tensor:
    from flash_attn import flash_attn_varlen_func

    return flash_attn_varlen_func(q, k, v, b.cu_seqlens, b.cu_seqlens, b.max_seqlen, b.max_seqlen,
                                  dropout_p=dropout, softmax_scale=scale, causal=True,
                                  window_size=(-1, -1) if window is None else (window - 1, window - 1),
                                  softcap=softcap or 0.0,
                                  # train.deterministic: flash-attn's deterministic backward (no atomic adds)
                                  deterministic=torch.are_deterministic_algorithms_enabled())


# FlexAttention's compiled versions one process may need (grad and no-grad, a few stream shapes and dtypes, the
# runs of a test session or the web UI): past torch's default limit of 8, dynamo would run a call eagerly, and a
# block checkpointed by a compiled call but recomputed by an eager one saves other tensors in another order
# (torch.utils.checkpoint's CheckpointError)
FLEX_RECOMPILES = 64


@functools.lru_cache(maxsize=1)
def _compiled_flex():
    """Compiled once; torch.compile's automatic dynamic shapes take over after the first new length. (A checkpointed
    block's recompute runs with its forward pass's thread count, which dynamo guards on: `model._recompute_as_forward`.)"""
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention)


@contextlib.contextmanager
def _recompile_budget() -> Iterator[None]:
    """The context of a compiled FlexAttention call: dynamo's recompile limit at least FLEX_RECOMPILES (its
    documented setting, raised for the call and put back after; a few microseconds)."""
    import torch._dynamo

    config = torch._dynamo.config
    name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
    before = int(getattr(config, name))
    if before >= FLEX_RECOMPILES:
        yield
        return
    setattr(config, name, FLEX_RECOMPILES)
    try:
        yield
    finally:
        setattr(config, name, before)


def softcap_mod(softcap: float | None, device: torch.device):
    """FlexAttention's score_mod for a logit soft-cap (None without one)."""
    if softcap is None:
        return None
    # the cap as a tensor: a Python float captured here becomes an unbacked scalar under dynamic shapes,
    # which Inductor cannot lower in the score_mod (torch 2.11, seen on the H200)
    cap = torch.tensor(float(softcap), device=device)

    def score_mod(score, bi, h, qi, ki):
        return torch.tanh(score / cap) * cap
    return score_mod


def _flex(q: Tensor, k: Tensor, v: Tensor, b: Boundaries, scale: float, window: int | None,
          softcap: float | None, dropout: float) -> Tensor:
    from torch.nn.attention.flex_attention import flex_attention

    if dropout:
        raise ConfigError("attention dropout is not available with FlexAttention; use the sdpa or flash backend")
    score_mod = softcap_mod(softcap, q.device)
    qh, kh, vh = (t.transpose(0, 1)[None] for t in (q, k, v))
    kwargs = {"score_mod": score_mod, "block_mask": b.block_mask(window), "scale": scale,
              "enable_gqa": q.shape[1] != k.shape[1]}
    if q.is_cuda and not torch.is_grad_enabled() and not torch.is_inference_mode_enabled():
        # without gradient (a preference method's reference pass, evaluation): through the graph compiled for
        # training (inputs that require grad, as LoRA on q, k and v makes them), its output detached, instead of
        # compiling an inference graph as well: one FlexAttention compile per stream shape, not two
        with torch.enable_grad(), _recompile_budget():
            qg, kg, vg = (t.detach().requires_grad_() for t in (qh, kh, vh))
            out = _compiled_flex()(qg, kg, vg, **kwargs).detach()
    elif q.is_cuda:
        with _recompile_budget():
            out = _compiled_flex()(qh, kh, vh, **kwargs)
    else:  # unfused (and slow) off CUDA: for tests
        out = flex_attention(qh, kh, vh, **kwargs)
    return out[0].transpose(0, 1)


def _equal_rows(q: Tensor, k: Tensor, v: Tensor, b: Boundaries, scale: float, window: int | None,
                softcap: float | None, dropout: float) -> Tensor:
    """Samples of one length L, none continuing a cache: rows [S, heads, L, D] under SDPA's own causal mask
    (its flash kernel on CUDA; no mask tensor, no block mask, no compilation). The kv heads are repeated for
    their query heads, so that every SDPA backend takes the call."""
    s, n = len(b.lengths), b.max_seqlen
    groups = q.shape[1] // k.shape[1]
    qr, kr, vr = (t.reshape(s, n, t.shape[1], t.shape[2]).transpose(1, 2) for t in (q, k, v))
    kr, vr = _repeat_kv(kr, groups), _repeat_kv(vr, groups)
    out = F.scaled_dot_product_attention(qr, kr, vr, dropout_p=dropout, is_causal=True, scale=scale)
    return out.transpose(1, 2).reshape(q.shape)


def equal_rows(b: Boundaries, window: int | None, softcap: float | None) -> bool:
    """The stream is rows of one length (a padded batch, one sample) that plain causal SDPA attends exactly."""
    return (window is None and softcap is None and not b.device_only and len(set(b.lengths)) == 1
            and not any(b.offsets))


# FlexAttention's compiled kernel works on blocks of this many queries; a shorter stream would take its decoding
# kernel, which Inductor (torch 2.11) fails to build for a training stream: such streams go to SDPA (tiny masks)
FLEX_MIN_TOKENS = 128

_IMPLS = {"sdpa": _sdpa, "flash": _flash, "flex": _flex}


def resolve_backend(name: str, device: torch.device, dtype: torch.dtype) -> str:
    """The attention implementation `name` stands for on this device and dtype (`auto`: the fastest present)."""
    if name not in BACKENDS:
        raise ConfigError(f"attention backend {name!r}: expected one of {', '.join(BACKENDS)}")
    cuda16 = device.type == "cuda" and dtype in (torch.float16, torch.bfloat16)
    if name == "auto":
        if cuda16 and flash_available():
            return "flash"
        return "flex" if device.type == "cuda" and flex_available() else "sdpa"
    if name == "flash" and not (cuda16 and flash_available()):
        raise ConfigError("attention backend 'flash' needs the flash-attn package, a CUDA device and 16-bit compute")
    if name == "flex" and not flex_available():
        raise ConfigError("attention backend 'flex' needs a PyTorch with torch.nn.attention.flex_attention")
    return name


def route(b: Boundaries, window: int | None, softcap: float | None, backend: str) -> str:
    """The implementation `attend` takes for these boundaries: rows of one length (`equal_rows`) take SDPA's
    causal kernel ("rows"), a FlexAttention stream under FLEX_MIN_TOKENS tokens the SDPA path, boundaries made
    on the device FlexAttention instead of flash (which needs the lengths on the host)."""
    if backend == "flash" and b.device_only:
        backend = "flex" if flex_available() else "sdpa"
    if backend != "flash" and equal_rows(b, window, softcap):
        return "rows"
    if backend == "flex" and b.n_tokens < FLEX_MIN_TOKENS:
        return "sdpa"
    return backend


def prepare(b: Boundaries, windows: Iterable[int | None], softcap: float | None, backend: str) -> None:
    """Build every mask that `attend` will read from `b` for layers of these windows, now.

    Called before the decoder's layers run, so that no mask is first built inside a checkpointed block: the
    forward pass and its recomputation in the backward pass then do exactly the same work on the same tensors
    (the recompute finds what the forward built, never builds it in a different order or on another path)."""
    for window in dict.fromkeys(windows):
        path = route(b, window, softcap, backend)
        if path == "flex":
            b.block_mask(window)
        elif path == "sdpa":
            if _rows_pay(b):
                b.padded_layout()
                b.padded_mask(window)
            else:
                b.dense_mask(window)


def attend(q: Tensor, k: Tensor, v: Tensor, b: Boundaries, *, scale: float, window: int | None = None,
           softcap: float | None = None, dropout: float = 0.0, backend: str = "sdpa") -> Tensor:
    """Causal attention within each sample of the stream: q [N, H, D], k/v [N, H_kv, D] -> [N, H, D].

    Whatever the backend, rows of one length (`equal_rows`) take SDPA's causal kernel, and a FlexAttention
    stream under FLEX_MIN_TOKENS tokens the SDPA path. Boundaries made on the device (`Boundaries.on_device`) go
    to FlexAttention instead of flash (which needs the lengths on the host): see `route`."""
    path = route(b, window, softcap, backend)
    if path == "rows":
        return _equal_rows(q, k, v, b, scale, window, softcap, dropout)
    return _IMPLS[path](q, k, v, b, scale, window, softcap, dropout)
