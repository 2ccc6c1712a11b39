"""The decoder: embedding -> blocks (attention + gated MLP, pre-norm residuals) -> norm -> output head.

One readable model for every family we own; what differs is read from `DecoderConfig` fields, never from
a model's name. Tokens flow as one stream [N, hidden] of samples laid end to end (`Boundaries`), so a
packed batch, a padded batch seen as equal-length samples and a generation step are the same forward pass.

    x = embed(ids) (* sqrt(hidden): Gemma)
    per block:  h = attn(norm(x));  h = post_norm(h) (Gemma 2/3);  x = x + h
                h = mlp(norm(x));   h = post_norm(h) (Gemma 2/3);  x = x + h
    attn:       q, k, v = projections (fused qkv: Phi-3; biases: Qwen2);  q, k = qk_norm (Qwen3, Gemma 3)
                q, k = RoPE(positions);  causal attention within each sample (sliding window, soft-cap)
    mlp:        down(act(gate) * up), act = SiLU (SwiGLU) or tanh-GELU (GeGLU); fused gate_up: Phi-3
    logits = head(norm(x)) (soft-capped: Gemma 2)

Every linear layer is a `QLoRALinear` (frozen base as the checkpoint stores it, optional LoRA adapter).
`Decoder(config, weights)` takes its tensors by our parameter names (`loratune.decoder.keys`), without
copying; `loratune.decoder.load` builds it from a checkpoint.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from loratune.decoder.attention import Boundaries, attend, prepare, resolve_backend
from loratune.decoder.cache import KVCache
from loratune.decoder.config import DecoderConfig
from loratune.decoder.keys import (
    hf_module_name,
    linear_names,
    projection_names,
    weight_names,
)
from loratune.decoder.lora import QLoRALinear, project_group
from loratune.decoder.norm import RMSNorm
from loratune.decoder.rope import Rotary, apply_rope
from loratune.decoder.s2_attn import S2Groups, prepare_s2, s2_attend
from loratune.errors import ConfigError, ModelError
from loratune.kernels.lora_linear import AdapterCasts
from loratune.kernels.norm_swiglu import silu_mul


def _frozen(t: Tensor) -> nn.Parameter:
    """The tensor itself if it is a parameter already (its owner decided requires_grad), else a frozen one."""
    return t if isinstance(t, nn.Parameter) else nn.Parameter(t, requires_grad=False)


class Attention(nn.Module):
    def __init__(self, cfg: DecoderConfig, layer: int, w: Mapping[str, Tensor], dtype: torch.dtype) -> None:
        super().__init__()
        p = f"layers.{layer}.attn."
        for leaf in projection_names(cfg)[0]:
            setattr(self, leaf, QLoRALinear(w[p + leaf + ".weight"], w.get(p + leaf + ".bias"), dtype))
        if cfg.qk_norm:
            self.q_norm = RMSNorm(w[p + "q_norm.weight"], cfg.rms_norm_eps, cfg.norm_unit_offset)
            self.k_norm = RMSNorm(w[p + "k_norm.weight"], cfg.rms_norm_eps, cfg.norm_unit_offset)
        self.cfg, self.layer, self.window = cfg, layer, cfg.windows[layer]

    def project(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        cfg = self.cfg
        if cfg.fused_qkv:
            q, k, v = self.qkv_proj(x).split([cfg.q_size, cfg.kv_size, cfg.kv_size], dim=-1)
        else:
            q, k, v = project_group([self.q_proj, self.k_proj, self.v_proj], x)
        n = x.shape[0]
        return (q.reshape(n, cfg.num_heads, cfg.head_dim), k.reshape(n, cfg.num_kv_heads, cfg.head_dim),
                v.reshape(n, cfg.num_kv_heads, cfg.head_dim))

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, b: Boundaries, backend: str,
                cache: KVCache | None = None, s2: S2Groups | None = None) -> Tensor:
        cfg = self.cfg
        q, k, v = self.project(x)
        if cfg.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            out = cache.attend(self.layer, q, k, v, b, scale=cfg.attn_scale, window=self.window,
                               softcap=cfg.attn_softcap, backend=backend)
        elif s2 is not None:  # S²-Attn (training only: `Decoder.s2_group`)
            out = s2_attend(q, k, v, s2, scale=cfg.attn_scale, window=self.window, softcap=cfg.attn_softcap,
                            dropout=cfg.attention_dropout if self.training else 0.0, backend=backend)
        else:
            out = attend(q, k, v, b, scale=cfg.attn_scale, window=self.window, softcap=cfg.attn_softcap,
                         dropout=cfg.attention_dropout if self.training else 0.0, backend=backend)
        return self.o_proj(out.reshape(x.shape[0], cfg.q_size))


class GatedMLP(nn.Module):
    def __init__(self, cfg: DecoderConfig, layer: int, w: Mapping[str, Tensor], dtype: torch.dtype) -> None:
        super().__init__()
        p = f"layers.{layer}.mlp."
        for leaf in projection_names(cfg)[1]:
            setattr(self, leaf, QLoRALinear(w[p + leaf + ".weight"], w.get(p + leaf + ".bias"), dtype))
        self.down_proj.ends_block = True  # a residual add follows: its fused backward may skip the recompute
        self.cfg = cfg
        self.kernels = True  # the SwiGLU Triton kernel on CUDA (False: its plain-PyTorch path)

    def forward(self, x: Tensor) -> Tensor:
        if self.cfg.fused_gate_up:
            gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
            separate = False
        else:
            gate, up = project_group([self.gate_proj, self.up_proj], x)
            separate = True
        act = self.cfg.activation
        if act == "silu":
            h = silu_mul(gate, up, reuse_inputs=separate, triton=self.kernels)  # outputs feed only this product
        else:
            h = F.gelu(gate, approximate="tanh" if act == "gelu_tanh" else "none") * up
        return self.down_proj(h)


class Block(nn.Module):
    def __init__(self, cfg: DecoderConfig, layer: int, w: Mapping[str, Tensor], dtype: torch.dtype) -> None:
        super().__init__()
        p, eps, unit = f"layers.{layer}.", cfg.rms_norm_eps, cfg.norm_unit_offset
        self.attn_norm = RMSNorm(w[p + "attn_norm.weight"], eps, unit)
        self.attn = Attention(cfg, layer, w, dtype)
        self.mlp_norm = RMSNorm(w[p + "mlp_norm.weight"], eps, unit)
        self.mlp = GatedMLP(cfg, layer, w, dtype)
        if cfg.sandwich_norms:
            self.post_attn_norm = RMSNorm(w[p + "post_attn_norm.weight"], eps, unit)
            self.post_mlp_norm = RMSNorm(w[p + "post_mlp_norm.weight"], eps, unit)
        self.sandwich, self.residual_dropout = cfg.sandwich_norms, cfg.residual_dropout

    def _residual(self, h: Tensor) -> Tensor:
        return F.dropout(h, self.residual_dropout, training=True) if self.training and self.residual_dropout else h

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, b: Boundaries, backend: str,
                cache: KVCache | None = None, s2: S2Groups | None = None) -> Tensor:
        h = self.attn(self.attn_norm(x), cos, sin, b, backend, cache, s2)
        if self.sandwich:
            h = self.post_attn_norm(h)
        x = x + self._residual(h)
        h = self.mlp(self.mlp_norm(x))
        if self.sandwich:
            h = self.post_mlp_norm(h)
        return x + self._residual(h)


class TokenEmbedding(nn.Module):
    """The frozen input embedding, on the compute device or kept in host memory (`to_host`).

    In host memory (training on CUDA with an untied head, `model.embedding_on_host`: a 128k x 4096 bf16 table is
    1 GiB less on the GPU) the rows of a batch are gathered on the host into pinned memory and copied to the
    device without blocking: give it host ids (the runner has them before it moves the batch). Device ids are
    read back first (a sync; generation on the training model), and refused inside a CUDA graph capture, whose
    caller then runs eagerly. On CPU the same code runs with the "device" being the CPU too (tests)."""

    def __init__(self, weight: Tensor, scale: float | None) -> None:
        super().__init__()
        self.weight, self.scale = _frozen(weight), scale
        self.device: torch.device | None = None  # set by `to_host`: where the gathered rows go

    @property
    def on_host(self) -> bool:
        return self.device is not None

    def to_host(self, device: torch.device | str) -> None:
        """Keep the table in host memory from now on; rows go to `device` (the decoder's compute device)."""
        if self.weight.requires_grad:
            raise ValueError("a trained input embedding cannot be kept in host memory")
        self.device = torch.device(device)
        self.weight = nn.Parameter(self.weight.detach().to("cpu"), requires_grad=False)

    def forward(self, ids: Tensor) -> Tensor:
        x = self._gather(ids) if self.on_host else F.embedding(ids, self.weight)
        # transformers multiplies by the scale rounded to the weight dtype (sqrt(3072) is 55.5 in bf16)
        return x if self.scale is None else x * torch.tensor(self.scale, dtype=self.weight.dtype, device=x.device)

    def _gather(self, ids: Tensor) -> Tensor:
        if ids.device.type != "cpu":
            if ids.is_cuda and torch.cuda.is_current_stream_capturing():
                raise RuntimeError("the input embedding is in host memory: its ids must be host tensors in a "
                                   "captured CUDA graph")
            ids = ids.cpu()
        cuda = self.device.type == "cuda"
        rows = torch.empty((ids.numel(), self.weight.shape[1]), dtype=self.weight.dtype, pin_memory=cuda)
        torch.index_select(self.weight, 0, ids.reshape(-1), out=rows)
        # from pinned memory: queued without waiting; the pinned block is reused only after the copy (host allocator)
        return rows.to(self.device, non_blocking=cuda).view(*ids.shape, -1)


class OutputHead(nn.Module):
    def __init__(self, weight: Tensor, softcap: float | None) -> None:
        super().__init__()
        self.weight, self.softcap = _frozen(weight), softcap

    def forward(self, h: Tensor) -> Tensor:
        logits = F.linear(h, self.weight.to(h.dtype))
        if self.softcap is not None:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits


@contextlib.contextmanager
def _intra_op_threads(n: int) -> Iterator[None]:
    before = torch.get_num_threads()
    if before != n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        if before != n:
            torch.set_num_threads(before)


def _recompute_as_forward() -> tuple[contextlib.AbstractContextManager, contextlib.AbstractContextManager]:
    """Checkpoint contexts (forward, recompute): the recompute runs with the forward pass's intra-op thread count.

    On CUDA the backward pass, and so the recompute of a checkpointed block, runs on autograd's device thread,
    whose thread count was fixed when that thread started and may differ from the caller's. Compiled
    FlexAttention's guards include the count: without this the recompute would compile another graph, or past
    the recompile limit run eagerly and save other tensors than the forward pass (a CheckpointError)."""
    return contextlib.nullcontext(), _intra_op_threads(torch.get_num_threads())


class Decoder(nn.Module):
    """A causal LM over token streams: `forward(ids, boundaries) -> logits`; see the module docstring.

    `weights`: {our parameter name: tensor}, every name of `keys.weight_names(config)` (bitsandbytes 4-bit
    `Params4bit` for quantized projections); taken as they are, not copied. `compute_dtype`: the dtype of
    the activations and products (default: the embedding's dtype). `attention`: auto | sdpa | flash | flex.
    `checkpointing`: recompute each block in the backward pass (non-reentrant activation checkpointing).
    """

    def __init__(self, config: DecoderConfig, weights: Mapping[str, Tensor], *, compute_dtype: torch.dtype | None = None,
                 attention: str = "auto", checkpointing: bool = False) -> None:
        super().__init__()
        missing = sorted(set(weight_names(config)) - set(weights))
        if missing:
            raise ModelError(f"the decoder's weights lack {missing[:4]}{' ...' if len(missing) > 4 else ''} "
                             f"({len(missing)} of {len(weight_names(config))})")
        self.config = config
        embed = weights["embed.weight"]
        dtype = compute_dtype or embed.dtype
        self.compute_dtype = dtype
        self.embed = TokenEmbedding(embed, config.embed_scale)
        self.layers = nn.ModuleList(Block(config, i, weights, dtype) for i in range(config.num_layers))
        self.norm = RMSNorm(weights["norm.weight"], config.rms_norm_eps, config.norm_unit_offset)
        self.head = OutputHead(self.embed.weight if config.tie_embeddings else weights["head.weight"],
                               config.final_softcap)
        distinct = list(dict.fromkeys(config.rope))
        self.ropes = nn.ModuleList(Rotary(rc, embed.device) for rc in distinct)
        self.rope_of_layer = tuple(distinct.index(rc) for rc in config.rope)
        self.attention, self.checkpointing = attention, checkpointing
        resolve_backend(attention, embed.device, dtype)  # an impossible choice fails here, not mid-run
        self.casts = AdapterCasts()
        self.kernels = True  # loratune's Triton kernels on CUDA (`use_kernels`)
        self.neftune_alpha = 0.0  # > 0: NEFTune noise on the embeddings in training mode (loratune.model.neftune)
        self.s2_group: float | None = None  # S²-Attn's group (fraction or tokens) in training mode (decoder.s2_attn)

    # ------------------------------------------------------------------------------------------ forward

    def _boundaries(self, ids: Tensor, boundaries: Boundaries | None, cache: KVCache | None) -> Boundaries:
        rows = ids.shape[0] if ids.dim() == 2 else 1
        if boundaries is None:
            per_row = ids.shape[-1]
            if cache is not None:
                return cache.boundaries([per_row] * rows)
            return Boundaries.from_lengths([per_row] * rows, ids.device)
        if boundaries.n_tokens != ids.numel():
            raise ValueError(f"the boundaries cover {boundaries.n_tokens} tokens, the batch holds {ids.numel()}")
        if cache is not None:
            cache.check(boundaries)
        return boundaries

    def hidden_states(self, input_ids: Tensor, boundaries: Boundaries | None = None,
                      cache: KVCache | None = None, inputs_embeds: Tensor | None = None) -> Tensor:
        """Final-norm hidden states [N, hidden] of the token stream (input [N], [1, N], or [B, T] read as B
        samples of T tokens when no boundaries are given). `inputs_embeds` [N, hidden]: `embed(input_ids)` made
        by the caller (an embedding in host memory, looked up on host ids before the batch moves)."""
        b = self._boundaries(input_ids, boundaries, cache)
        x = (self.embed(input_ids.reshape(-1)) if inputs_embeds is None else inputs_embeds).to(self.compute_dtype)
        if self.training and self.neftune_alpha > 0 and cache is None:
            from loratune.model.neftune import add_noise, token_lengths

            x = add_noise(x, token_lengths(b.positions), self.neftune_alpha)
        backend = resolve_backend(self.attention, x.device, x.dtype)
        extent = b.extent() if any(r.needs_extent for r in self.ropes) else None
        tables = [rope(b.positions, x.dtype, extent) for rope in self.ropes]
        recompute = self.checkpointing and cache is None and torch.is_grad_enabled()
        if cache is None:  # every mask the layers read, built here: never first inside a checkpointed block
            prepare(b, self.config.windows, self.config.attn_softcap, backend)
        s2 = None
        if self.training and self.s2_group is not None and cache is None:
            s2 = S2Groups.build(b, self.s2_group, self.config.num_heads)
            prepare_s2(s2, self.config.windows, backend, x.device)
        for block, r in zip(self.layers, self.rope_of_layer):
            cos, sin = tables[r]
            if recompute:
                x = checkpoint(block, x, cos, sin, b, backend, None, s2, use_reentrant=False,
                               context_fn=_recompute_as_forward)
            else:
                x = block(x, cos, sin, b, backend, cache, s2)
        if cache is not None:
            cache.commit(b)
        return self.norm(x)

    def logits(self, hidden: Tensor) -> Tensor:
        return self.head(hidden)

    def forward(self, input_ids: Tensor, boundaries: Boundaries | None = None, cache: KVCache | None = None) -> Tensor:
        """Logits in the input's layout: [N, V] for a stream, [B, T, V] for B samples of T tokens."""
        logits = self.logits(self.hidden_states(input_ids, boundaries, cache))
        return logits.reshape(*input_ids.shape, -1)

    @property
    def device(self) -> torch.device:
        """The compute device (the input embedding may be in host memory: `TokenEmbedding.to_host`)."""
        return self.norm.weight.device

    def embed_on_host(self) -> None:
        """Keep the frozen input embedding in host memory (`TokenEmbedding`); refused for a head tied to it."""
        if self.config.tie_embeddings:
            raise ConfigError("model.embedding_on_host: this model's output head is tied to its input embedding, "
                              "which must stay on the GPU")
        self.embed.to_host(self.device)

    def new_cache(self, batch: int, capacity: int) -> KVCache:
        return KVCache(self.config, batch, capacity, self.compute_dtype, self.device)

    # ------------------------------------------------------------------------------------------ adapters

    def linear_layers(self) -> dict[str, QLoRALinear]:
        """{our name: layer} of every projection (adapter candidates), in block order."""
        return {name: self.get_submodule(name) for name in linear_names(self.config)}

    def hf_name(self, ours: str) -> str:
        """The HF (and peft) module name of one of our projections."""
        return hf_module_name(ours, self.config.hf_prefix)

    def adapted_layers(self) -> dict[str, QLoRALinear]:
        return {name: m for name, m in self.linear_layers().items() if m.lora_A is not None}

    def add_adapters(self, rank: int, alpha: float, dropout: float = 0.0, rslora: bool = False,
                     targets: str | list[str] | tuple[str, ...] = "all-linear", exclude: tuple[str, ...] = (),
                     seed: int | None = None) -> list[str]:
        """Fresh LoRA adapters (peft's initialisation) on the projections `targets` selects; returns their names.

        `targets`/`exclude` are matched as loratune's `adapter.target_modules` are: `all-linear`, or module-name
        suffixes of the HF model (`q_proj`, `self_attn.q_proj`, `model.layers.0.mlp.down_proj`)."""
        chosen = select_layers(self.config, targets, exclude)
        generator = None if seed is None else torch.Generator(device=self.device).manual_seed(seed)
        layers = self.linear_layers()
        for name in chosen:
            layers[name].add_adapter(rank, alpha, dropout, rslora, self.casts, generator)
        self.track_adapters()
        return chosen

    def use_kernels(self, on: bool) -> None:
        """loratune's Triton kernels (RMSNorm, SwiGLU, NF4 dequantization, the loss's cross-entropy rows) on CUDA for
        this decoder's modules, or their plain-PyTorch references (model.kernels false). No effect off CUDA."""
        self.kernels = on
        for m in self.modules():
            if isinstance(m, (RMSNorm, GatedMLP, QLoRALinear)):
                m.kernels = on

    def track_adapters(self) -> None:
        """Tell the shared adapter casts which weights (and scales) exist: after adding or loading adapters."""
        adapted = list(self.adapted_layers().values())
        self.casts.track([w for m in adapted for w in (m.lora_A, m.lora_B)], {id(m.lora_B): m.scale for m in adapted})

    @contextlib.contextmanager
    def frozen_adapters(self) -> Iterator[None]:
        """Promise that no adapter weight changes inside (one optimizer step's passes): the compute-dtype casts
        of the adapter weights are then made once for all passes inside (`kernels.lora_linear.AdapterCasts`)."""
        with self.casts.frozen():
            yield


def _suffix(name: str, suffixes: list[str] | tuple[str, ...]) -> bool:
    return any(name == s or name.endswith("." + s) for s in suffixes)


def select_layers(cfg: DecoderConfig, targets: str | list[str] | tuple[str, ...],
                  exclude: list[str] | tuple[str, ...] = ()) -> list[str]:
    """Our names of the projections picked by `targets`/`exclude` (matched against the HF module names)."""
    ours = linear_names(cfg)
    hf = {name: hf_module_name(name, cfg.hf_prefix) for name in ours}
    if targets == "all-linear":
        chosen = list(ours)
    else:
        if isinstance(targets, str):
            raise ConfigError(f"adapter targets: expected 'all-linear' or a list of module names, got {targets!r}")
        chosen = [n for n in ours if _suffix(hf[n], targets)]
        missing = [t for t in targets if not any(_suffix(hf[n], [t]) for n in ours)]
        if missing:
            leaves = sorted({n.rsplit(".", 1)[-1] for n in ours})
            raise ConfigError(f"adapter.target_modules: no linear layer named {missing} in this {cfg.model_type} "
                              f"decoder; its linear layers are: {', '.join(leaves)}")
    chosen = [n for n in chosen if not _suffix(hf[n], exclude)]
    if not chosen:
        raise ConfigError("adapter.target_modules/exclude_modules leave no module to adapt")
    return chosen
