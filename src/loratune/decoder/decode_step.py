"""One decode step of the decoder over a static KV cache: one new token for each of B rows, nothing read back.

Why a step of its own: the general forward pass (`Decoder.hidden_states` with a `KVCache`) builds its
`Boundaries` from lengths on the host and lets each layer choose a path by them, which a CUDA graph cannot
capture. Here every shape is fixed by (B, L): B rows (a batch bucket), keys attended up to L (a bucket of
the longest row's length), and every per-step value lives on the device:

    positions = cache.device_lengths[slots]                    each row's next position, on the device
    x = embed(tokens);  per block, as `decoder.model.Block`:
        q, k, v = projections (`decode_linear`),  qk-norm,  RoPE(positions)
        keys[slots, :, positions] = k  (values likewise)        one indexed write per layer
        attention of q over each row's keys up to its position (`kernels.decode_attention`): on CUDA a
        Triton kernel reading the cache in place; elsewhere keys[slots, :, :L] gathered, those past each
        row's position (and outside the sliding window) masked, the G = H / H_kv query heads of each kv
        head as G queries (no repeated keys)
        o_proj;  MLP (`decode_linear` for gate/up/down)
    cache.device_lengths[slots] = positions + 1;  logits = head(norm(x))  [B, V]

Rows may repeat a slot (a bucket's padding repeats its first row): they compute and write the same values.
Rows on several adapters at once (`decoder.multi_lora`'s row plan, made on the host for each pass) add their
segmented update after each base product; the runner then steps them eagerly, unpadded.

`decode_linear` is the decoder's linear layer for a few rows: a 4-bit base through the NF4 matrix-vector
kernel with the LoRA update in the same call (`kernels.nf4_matvec`: Triton on CUDA, dequantize-and-multiply
elsewhere), a dense base through F.linear. The adapter weights are cast once to the compute dtype (B with
its scale) by `StepWeights`, which owns them (a captured graph reads their addresses) and notices when the
decoder's adapters change (`signature`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from loratune.decoder.cache import KVCache
from loratune.decoder.lora import QLoRALinear
from loratune.decoder.model import Block, Decoder
from loratune.decoder.rope import apply_rope
from loratune.kernels.decode_attention import decode_attention
from loratune.kernels.decode_attention import fits_kernel as fits_kernel_attention
from loratune.kernels.nf4_matvec import fits_kernel, nf4_matvec
from loratune.kernels.norm_swiglu import silu_mul


@dataclass
class LayerWeights:
    """What `decode_linear` reads of one layer: its bias and adapter in the compute dtype, the 4-bit kernel's
    arguments (None: dense base, or no kernel here)."""

    bias: Tensor | None
    lora: tuple[Tensor, Tensor] | None  # (A [r, in], scale * B [out, r])
    args: tuple | None


def adapter_signature(layers: list[QLoRALinear]) -> tuple:
    """What the step's weight casts depend on: each layer's adapter tensors (identity and in-place version),
    scale and whether it is enabled."""
    return tuple((id(m.lora_A), id(m.lora_B), m.lora_A._version if m.lora_A is not None else 0,
                  m.lora_B._version if m.lora_B is not None else 0, m.rank, m.alpha, m.rslora, m.adapter_enabled)
                 for m in layers)


class StepWeights:
    """The compute-dtype casts `decode_linear` uses, one `LayerWeights` per projection, made by `refresh`."""

    def __init__(self, decoder: Decoder) -> None:
        self.modules = list(decoder.linear_layers().values())
        self.casts = decoder.casts
        self._window: dict | None = None  # the frozen-adapters window last checked in (its copies dict, held)
        self.groups = [g for block in decoder.layers for g in _input_groups(block)]
        self.signature: tuple | None = None
        self.layers: dict[int, LayerWeights] = {}
        self.stacked: dict[tuple[int, ...], Tensor] = {}  # layers reading one input: their A matrices stacked

    def refresh(self) -> bool:
        """Recast if the decoder's adapters changed since the last call; True when it did (graphs are stale).

        Inside one `Decoder.frozen_adapters()` window (the caller's promise that no adapter changes) the layers
        are compared once: the window is recognised by its own copies dict, which is held here so that its
        identity cannot pass to a later one (the comparison costs ~1 ms of host time per step for 224 layers)."""
        window = self.casts.copies if self.casts.active else None
        if window is not None and window is self._window:
            return False
        self._window = window
        sig = adapter_signature(self.modules)
        if sig == self.signature:
            return False
        self.layers = {id(m): self._cast(m) for m in self.modules}
        self.stacked = {}
        for group in self.groups:
            loras = [self.layers[id(m)].lora for m in group]
            if all(lo is not None for lo in loras):
                self.stacked[tuple(id(m) for m in group)] = torch.cat([lo[0] for lo in loras]).contiguous()
        self.signature = sig
        return True

    def project(self, layers: tuple[QLoRALinear, ...], x: Tensor) -> list[Tensor]:
        """`[decode_linear(m, x, ...) for m in layers]`, x A^T made once for all of them when each has an adapter."""
        stacked = self.stacked.get(tuple(id(m) for m in layers))
        if stacked is None:
            return [decode_linear(m, x, self[m]) for m in layers]
        xa = F.linear(x, stacked)
        outs, start = [], 0
        for m in layers:
            r = self[m].lora[0].shape[0]
            outs.append(decode_linear(m, x, self[m], xa[:, start:start + r]))
            start += r
        return outs

    def mixed(self) -> bool:
        """Whether the pass in progress puts rows on adapters of their own (`decoder.multi_lora`)."""
        return any(mixed_rows(m) for m in self.modules)

    @staticmethod
    def _cast(m: QLoRALinear) -> LayerWeights:
        dt = m.compute_dtype
        bias = None if m.bias is None else m.bias.detach().to(dt)
        lora = None
        if m.lora_A is not None and m.adapter_enabled:
            lora = (m.lora_A.detach().to(dt).contiguous(), (m.lora_B.detach() * m.scale).to(dt).contiguous())
        args = None
        qs = getattr(m.weight, "quant_state", None)
        if qs is not None and m.weight.is_cuda:
            from loratune.kernels.nf4 import triton_available

            if triton_available():
                from loratune.kernels._nf4_triton import kernel_args

                args = kernel_args(m.weight.data, qs)
        return LayerWeights(bias, lora, args)

    def __getitem__(self, m: QLoRALinear) -> LayerWeights:
        return self.layers[id(m)]


def _input_groups(block: Block) -> list[tuple[QLoRALinear, ...]]:
    """The separate projections of a block that read one input: (q, k, v) and (gate, up)."""
    groups = []
    if not block.attn.cfg.fused_qkv:
        groups.append((block.attn.q_proj, block.attn.k_proj, block.attn.v_proj))
    if not block.mlp.cfg.fused_gate_up:
        groups.append((block.mlp.gate_proj, block.mlp.up_proj))
    return groups


def decode_linear(m: QLoRALinear, x: Tensor, w: LayerWeights, xa: Tensor | None = None) -> Tensor:
    """y = x W^T + b + (x A^T)(s B)^T for a few rows x [B, in] (compute dtype); see the module docstring.
    `xa`: x A^T when the caller made it (`StepWeights.project`)."""
    qs = getattr(m.weight, "quant_state", None)
    if qs is not None and fits_kernel(x, qs):
        y = nf4_matvec(x, m.weight.data, qs, w.bias, w.lora, w.args, xa)
    else:
        y = F.linear(x, m.weight_fn(x.dtype), w.bias)
        if w.lora is not None:
            y = y + F.linear(F.linear(x, w.lora[0]) if xa is None else xa, w.lora[1])
    if mixed_rows(m):  # rows on several adapters (`decoder.multi_lora`): each row's update on the base product
        y = m.mixed.add_to(y, x)
    return y


def mixed_rows(m: QLoRALinear) -> bool:
    """Whether the pass in progress puts rows of this layer on adapters of their own (`QLoRALinear.mixed`)."""
    return m.mixed is not None and m.mixed.active and m.adapter_enabled


def _attention(block: Block, x: Tensor, cos: Tensor, sin: Tensor, cache: KVCache, slots: Tensor, positions: Tensor,
               masks: dict[int | None, Tensor], weights: StepWeights) -> Tensor:
    attn = block.attn
    cfg = attn.cfg
    n = x.shape[0]
    if cfg.fused_qkv:
        q, k, v = decode_linear(attn.qkv_proj, x, weights[attn.qkv_proj]).split(
            [cfg.q_size, cfg.kv_size, cfg.kv_size], dim=-1)
    else:
        q, k, v = weights.project((attn.q_proj, attn.k_proj, attn.v_proj), x)
    q = q.reshape(n, cfg.num_heads, cfg.head_dim)
    k = k.reshape(n, cfg.num_kv_heads, cfg.head_dim)
    v = v.reshape(n, cfg.num_kv_heads, cfg.head_dim)
    if cfg.qk_norm:
        q, k = attn.q_norm(q), attn.k_norm(k)
    # q and k rotated as one tensor (the same numbers, half the launches)
    q, k = apply_rope(torch.cat([q, k], dim=1), cos, sin).split([cfg.num_heads, cfg.num_kv_heads], dim=1)
    keys, values = cache.keys[attn.layer], cache.values[attn.layer]
    keys[slots, :, positions] = k.to(keys.dtype)
    values[slots, :, positions] = v.to(values.dtype)
    out = decode_attention(q, keys, values, slots, positions, cfg.attn_scale, attn.window, cfg.attn_softcap,
                           masks.get(attn.window))
    return decode_linear(attn.o_proj, out.reshape(n, cfg.q_size), weights[attn.o_proj])


def attention_kernel(decoder: Decoder, device: torch.device) -> bool:
    """Whether the step attends through the Triton decode kernel (no key masks, no key bucket needed)."""
    return fits_kernel_attention(device, decoder.config.head_dim)


def _masks(positions: Tensor, kv_len: int, windows: set[int | None]) -> dict[int | None, Tensor]:
    """{window: [B, 1, 1, kv_len] bool}: the keys each row attends (up to its position, within the window), made
    once per step for every window the layers use."""
    kpos = torch.arange(kv_len, device=positions.device)[None, :]
    causal = kpos <= positions[:, None]
    return {w: (causal if w is None else causal & ((positions[:, None] - kpos) < w))[:, None, None, :]
            for w in windows}


def _mlp(block: Block, x: Tensor, weights: StepWeights) -> Tensor:
    mlp = block.mlp
    cfg = mlp.cfg
    if cfg.fused_gate_up:
        gate, up = decode_linear(mlp.gate_up_proj, x, weights[mlp.gate_up_proj]).chunk(2, dim=-1)
    else:
        gate, up = weights.project((mlp.gate_proj, mlp.up_proj), x)
    if cfg.activation == "silu":
        h = silu_mul(gate.contiguous(), up.contiguous())
    else:
        h = F.gelu(gate, approximate="tanh" if cfg.activation == "gelu_tanh" else "none") * up
    return decode_linear(mlp.down_proj, h, weights[mlp.down_proj])


def decode_step(decoder: Decoder, cache: KVCache, tokens: Tensor, slots: Tensor, kv_len: int,
                weights: StepWeights) -> Tensor:
    """Logits [B, V] of one new token per row (`tokens`, `slots`: [B] int64 on the cache's device); each row's
    position is its slot's `cache.device_lengths`, advanced by one. `kv_len`: keys attended per row, at least
    every row's position + 1 (a bucket of it, fixed for a captured graph)."""
    positions = cache.device_lengths[slots]
    x = decoder.embed(tokens).to(decoder.compute_dtype)
    extent = positions + 1 if any(getattr(r, "needs_extent", r.long_inv_freq is not None) for r in decoder.ropes) \
        else None
    tables = [rope(positions, x.dtype, extent) for rope in decoder.ropes]
    masks = {} if attention_kernel(decoder, x.device) else \
        _masks(positions, kv_len, {block.attn.window for block in decoder.layers})
    for block, r in zip(decoder.layers, decoder.rope_of_layer):
        cos, sin = tables[r]
        h = _attention(block, block.attn_norm(x), cos, sin, cache, slots, positions, masks, weights)
        if block.sandwich:
            h = block.post_attn_norm(h)
        x = x + h
        h = _mlp(block, block.mlp_norm(x), weights)
        if block.sandwich:
            h = block.post_mlp_norm(h)
        x = x + h
    cache.device_lengths[slots] = positions + 1
    return decoder.logits(decoder.norm(x))
