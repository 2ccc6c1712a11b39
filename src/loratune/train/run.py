"""`loratune train`: wire config -> tokenizer -> data -> model -> loop -> saved adapter.

The recipe in the torchtune sense: setup, train, save, each step a call into the stage that owns it.
"""

from __future__ import annotations

import logging
import random
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from loratune.config import Config
from loratune.data.pipeline import prepare_data
from loratune.model.adapters import attach_adapters, count_parameters
from loratune.model.load import enable_checkpointing, load_base, load_tokenizer
from loratune.model.quant import resolve_compute_dtype
from loratune.train.artifacts import prepare_output_dir, save_run
from loratune.train.loop import LoopState, Loop
from loratune.train.optim import build_optimizer
from loratune.train.progress import Reporter, memory_gib

log = logging.getLogger("loratune.train")


@dataclass
class TrainResult:
    out_dir: Path
    steps: int
    tokens: int
    seconds: float
    first_loss: float
    last_loss: float
    peak_memory_gib: float


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _device(model: torch.nn.Module) -> torch.device:
    return next(p.device for p in model.parameters())


def _precision(cfg: Config, device: torch.device) -> tuple[torch.dtype | None, torch.amp.GradScaler | None]:
    """Autocast dtype and loss scaler: bf16 needs no scaler; fp16 does; fp32 needs neither."""
    compute = resolve_compute_dtype(cfg.quantization.compute_dtype)
    if compute == torch.float32:
        return None, None
    scaler = torch.amp.GradScaler(device.type) if compute == torch.float16 else None
    return compute, scaler


def train(cfg: Config) -> TrainResult:
    """Fine-tune as `cfg` says and write the adapter to `cfg.output.dir`."""
    out = prepare_output_dir(cfg.output)
    seed_everything(cfg.train.seed)
    tokenizer, info = load_tokenizer(cfg.model)
    data = prepare_data(cfg.data, tokenizer, info, cfg.train.seed)
    log.info("data: %d training samples, %d eval samples, template %s", len(data.train), len(data.eval),
             data.template.name)

    model = load_base(cfg)
    if torch.cuda.is_available() and cfg.quantization.bits not in (4, 8):
        model.to("cuda")
    enable_checkpointing(model, cfg)
    model = attach_adapters(model, cfg.adapter)
    trainable, total = count_parameters(model)
    log.info("model: %s, %d-bit base, %s trainable of %s parameters (%.3f%%)", cfg.model.path,
             cfg.quantization.bits, f"{trainable:,}", f"{total:,}", 100 * trainable / max(total, 1))
    device = _device(model)

    autocast, scaler = _precision(cfg, device)
    optimizer = build_optimizer(model, cfg.train)
    loop = Loop(model, data.train, cfg.train, optimizer, info.pad_id, device, autocast, scaler)

    state = LoopState()
    first = last = float("nan")
    t0 = time.perf_counter()
    with Reporter(loop.total, out, cfg.train.log_every, device) as rep:
        for epoch, micro, window in loop.windows(state):
            state.epoch, state.micro = epoch, micro
            r = loop.step(state, window)
            first = r.loss if state.step == 1 else first
            last = r.loss if not r.skipped else last
            rep.step(state.step, epoch + micro / max(loop.n_micro, 1), r.loss, r.lr, r.grad_norm, r.tokens)
    seconds = time.perf_counter() - t0

    save_run(out, model, tokenizer, data.template, info, cfg,
             extra={"steps": state.step, "tokens": state.tokens, "seconds": round(seconds, 2)})
    result = TrainResult(out, state.step, state.tokens, seconds, first, last, memory_gib(device))
    print(f"done: {result.steps} steps, {result.tokens:,} tokens in {seconds:.0f}s, loss {first:.3f} -> {last:.3f}; "
          f"adapter written to {out}/")
    return result
