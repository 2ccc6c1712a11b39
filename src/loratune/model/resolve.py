"""Every "auto" of a training run decided once, before anything loads, and handed on as one object.

Why one place: the same questions (which model code trains, in what dtype, with activation checkpointing or
not, fused kernels, CUDA graphs, padded or padding-free micro-batches of how many tokens) are asked by the
memory plan, by model building and by the loop. Each asking on its own is how they drift apart (the plan
counting a fused MLP that the model runs plainly, say). `decide` answers them all from
the config, the device and the model's own config.json; `Resolved` carries the answers.

Which model code trains (`model.implementation`):
    loratune       loratune's own decoder (loratune.decoder): the architectures it covers (Llama, Mistral,
                   Qwen2/2.5/3, Gemma 1-3, Phi-3), LoRA on a 4-, 16- or 32-bit base
    transformers   the transformers model with peft's adapters, run as the libraries ship (no kernel, graph
                   or attention of ours inside it): everything else (8-bit bases, DoRA, modules_to_save, full
                   fine-tuning, other architectures), and the numerical reference
    auto           loratune where it covers the run, else transformers; `why` says which and why, in one line

The batch size is the one decision that needs the memory plan (`train.batch_size: auto` is the largest that
fits): `loratune.model.memory.plan_run` completes it with `Resolved.with_batch`.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Any

import torch

from loratune.config import Config
from loratune.errors import ConfigError, ModelError
from loratune.model.quant import DTYPES

ENV = "LORATUNE_IMPLEMENTATION"
IMPLEMENTATIONS = ("loratune", "transformers")


@dataclass(frozen=True)
class Resolved:
    """The run's decisions. `batch_size`/`tokens_per_batch` are None until the memory plan resolved them."""

    device: str  # "cuda" or "cpu"
    compute_dtype: torch.dtype
    implementation: str  # "loratune" (our decoder) or "transformers" (HF + peft)
    why: str  # the one line said at the start of a run
    checkpointing: bool  # activation checkpointing
    kernels: bool  # our decoder's Triton kernels (loratune.kernels, CUDA); the transformers fallback has none
    graphs: bool  # our decoder's fixed-shape streams replayed as CUDA graphs (never the transformers fallback)
    fused_mlp: bool  # SwiGLU through the fused kernel (our decoder on CUDA)
    padding_free: bool  # train.batching
    max_length: int  # data.max_length: the longest sample
    # padding-free streams padded to the token budget (our decoder on CUDA, every method: SFT and the preference
    # methods' pairs alike): every micro-batch has one shape, so compiled attention compiles once
    # instead of once per new length (and never meets a stream too short for its kernels); the padding is a segment
    # of its own that no label, no numbered sequence and no other sample sees
    pad_streams: bool = False
    # the decoder's frozen input embedding kept in host memory (model.embedding_on_host; loratune.decoder.model)
    embedding_on_host: bool = False
    batch_size: int | None = None  # samples per padded micro-batch; batch_size x grad_accum samples per step
    tokens_per_batch: int | None = None  # padding-free: the token budget of one micro-batch

    @property
    def decoder(self) -> bool:
        return self.implementation == "loratune"

    @property
    def tokens(self) -> int:
        """The tokens of the largest micro-batch: what the memory plan plans for."""
        if self.batch_size is None:
            raise ValueError("the batch size is not resolved yet (loratune.model.memory.plan_run)")
        return self.tokens_per_batch if self.padding_free else self.batch_size * self.max_length

    def with_batch(self, batch_size: int, tokens_per_batch: int | str = "auto") -> Resolved:
        """These decisions with the batch size (and the padding-free token budget: auto is batch x max_length)."""
        tokens = batch_size * self.max_length if tokens_per_batch == "auto" else int(tokens_per_batch)
        return dataclasses.replace(self, batch_size=int(batch_size), tokens_per_batch=tokens)

    def describe(self) -> str:
        """What a run says about the decisions, in one line."""
        if self.padding_free:
            batches = f"padding-free micro-batches of up to {self.tokens_per_batch:,} tokens"
            batches += " (padded to that: one shape)" if self.pad_streams else ""
        else:
            batches = f"padded micro-batches of {self.batch_size} samples"
        return f"{self.why}; {batches}"


def _device(device: str | None) -> str:
    if device is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device not in ("cuda", "cpu"):
        raise ConfigError(f"device {device!r}: expected cuda or cpu")
    return device


def compute_dtype(cfg: Config, device: str) -> torch.dtype:
    """quantization.compute_dtype on `device`: auto is fp32 on CPU, bf16 on a GPU that has it, else fp16
    (a GPU this process cannot see is assumed to have bf16)."""
    name = cfg.quantization.compute_dtype
    if name != "auto":
        return DTYPES[name]
    if device == "cpu":
        return torch.float32
    if torch.cuda.is_available() and not torch.cuda.is_bf16_supported():
        return torch.float16
    return torch.bfloat16


def checkpointing_on(cfg: Config) -> bool:
    """train.gradient_checkpointing: auto is on for quantized (2- to 8-bit) bases."""
    mode = cfg.train.gradient_checkpointing
    return mode is True or (mode == "auto" and cfg.quantization.bits <= 8)


def embedding_on_host(cfg: Config, device: str, decoder: bool, model_config: Any | None) -> bool:
    """model.embedding_on_host: auto is on for the decoder on CUDA with an untied head, not under FSDP; true
    anywhere the decoder trains (an error for a tied head); false never."""
    mode = cfg.model.embedding_on_host
    tied = bool(getattr(model_config, "tie_word_embeddings", False))
    if mode is True and decoder and tied:
        raise ConfigError("model.embedding_on_host: true, but this model's output head is tied to its input "
                          "embedding, which must stay on the GPU; set it to auto or false")
    if mode is True and decoder and cfg.train.strategy == "fsdp":
        raise ConfigError("model.embedding_on_host: true is not supported with train.strategy fsdp (FSDP places "
                          "the model by its input embedding's device); set it to auto or false")
    if mode == "auto":
        return decoder and device == "cuda" and not tied and cfg.train.strategy != "fsdp"
    return bool(mode) and decoder


def decoder_refusal(cfg: Config, model_config: Any | None) -> str | None:
    """Why loratune's decoder cannot train this run (None: it can)."""
    from loratune.decoder.config import decoder_config
    from loratune.decoder.load import check_supported

    if cfg.adapter.type == "none":
        return "full fine-tuning (adapter.type none) trains through transformers"
    if cfg.adapter.type == "freeze":
        return "freeze-tuning (adapter.type freeze) trains through transformers"
    try:
        check_supported(cfg)
    except ModelError as e:
        return str(e)
    if model_config is None:
        return "the model's config.json could not be read"
    saved = getattr(model_config, "quantization_config", None)
    method = saved.get("quant_method") if isinstance(saved, dict) else getattr(saved, "quant_method", None)
    if method is not None and str(getattr(method, "value", method)).lower() != "bitsandbytes":
        return (f"the checkpoint is saved {str(getattr(method, 'value', method)).upper()}-quantized: it trains "
                "through the HF + peft path, not loratune's decoder")
    try:
        decoder_config(model_config)
    except ModelError as e:
        return str(e)
    return None


def requested_implementation(cfg: Config) -> tuple[str, str]:
    """(auto | loratune | transformers, where the request came from)."""
    asked = cfg.model.implementation
    env = os.environ.get(ENV, "").strip()
    if asked == "auto" and env:
        if env not in IMPLEMENTATIONS:
            raise ConfigError(f"environment variable {ENV}={env!r}: expected one of {', '.join(IMPLEMENTATIONS)}")
        return env, f"{ENV}={env}"
    return asked, f"model.implementation={asked}"


def choose_implementation(cfg: Config, model_config: Any | None) -> tuple[str, str]:
    """(implementation, the one line that says which and why)."""
    asked, source = requested_implementation(cfg)
    if asked == "transformers":
        return "transformers", f"model: transformers + peft ({source})"
    refusal = decoder_refusal(cfg, model_config)
    model_type = getattr(model_config, "model_type", None) or "?"
    if refusal is None:
        return "loratune", f"model: loratune's decoder ({model_type})"
    if asked == "loratune":
        raise ModelError(f"{source}, but {refusal}")
    return "transformers", f"model: transformers + peft, the fallback: {refusal}"


def decide(cfg: Config, device: str | None = None, model_config: Any | None = None) -> Resolved:
    """The run's decisions for `cfg` on `device` (default: this machine's), from the model's transformers config
    (`model_config`; None when it cannot be read: the transformers path then)."""
    from loratune.kernels.graphs import graphs_wanted

    device = _device(device)
    implementation, why = choose_implementation(cfg, model_config)
    decoder = implementation == "loratune"
    if cfg.train.s2_attn and not decoder:
        raise ConfigError(f"train.s2_attn (shifted sparse attention) needs loratune's decoder, but this run trains "
                          f"through transformers + peft ({why}); set train.s2_attn false, or make the run fit the "
                          f"decoder")
    cuda = device == "cuda"
    kernels = cuda and decoder and cfg.model.kernels in ("auto", True)
    padding_free = cfg.train.batching == "padding_free"
    batch = cfg.train.batch_size if isinstance(cfg.train.batch_size, int) else None
    r = Resolved(
        device=device, compute_dtype=compute_dtype(cfg, device), implementation=implementation, why=why,
        checkpointing=checkpointing_on(cfg), kernels=kernels,
        # graphs replay our decoder's fixed-shape streams (pad_streams); the transformers fallback runs eagerly
        graphs=graphs_wanted(cfg, device) and decoder and padding_free and cfg.train.method == "sft",
        fused_mlp=kernels, padding_free=padding_free,
        pad_streams=padding_free and decoder and cuda, max_length=cfg.data.max_length,
        embedding_on_host=embedding_on_host(cfg, device, decoder, model_config))
    return r if batch is None else r.with_batch(batch, cfg.train.tokens_per_batch)
