"""What the GPU benchmarks that build a model from a shape share: the shapes, a timestamped log line, freeing memory,
and a random model of a shape saved with loratune's offline tokenizer, once, the way a hub checkpoint is laid out.

Why one module: bench_eval.py and bench_serve.py load such a checkpoint through the same public path a user's model
takes (`from_pretrained`), so the saved folder, its shapes and its tokenizer must be the same for both."""

from __future__ import annotations

import gc
import time
from collections.abc import Callable
from pathlib import Path

import torch

SHAPES: dict[str, dict] = {
    "llama3-8b": dict(model_type="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                      num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, rope_theta=500000.0,
                      rms_norm_eps=1e-5, max_position_embeddings=8192, tie_word_embeddings=False),
    "llama3.2-1b": dict(model_type="llama", vocab_size=128256, hidden_size=2048, intermediate_size=8192,
                        num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8, head_dim=64,
                        rope_theta=500000.0, rms_norm_eps=1e-5, max_position_embeddings=8192,
                        tie_word_embeddings=True),
    "tiny": dict(model_type="llama", vocab_size=4096, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, rope_theta=10000.0, rms_norm_eps=1e-5,
                 max_position_embeddings=2048, tie_word_embeddings=False),
}
TOKENIZER_VOCAB = 4096  # of the offline BPE (ids below every shape's vocabulary)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def free() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def build_model(shape: str, folder: Path, device: str, prepare: Callable | None = None) -> Path:
    """Random bf16 weights of `shape` and the offline tokenizer, saved like a hub checkpoint under `folder` (once:
    an existing folder is reused). `prepare(model, tokenizer)` may change the weights before they are saved."""
    if (folder / "config.json").is_file():
        log(f"reusing {folder}")
        return folder
    from transformers import AutoConfig, AutoModelForCausalLM

    from loratune.model.tiny import build_tokenizer

    tokenizer = build_tokenizer("llama", TOKENIZER_VOCAB)
    spec = dict(SHAPES[shape])
    ids = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    config = AutoConfig.for_model(spec.pop("model_type"), **spec, **ids)
    torch.manual_seed(0)
    t = time.time()
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    if prepare is not None:
        prepare(model, tokenizer)
    tmp = folder.with_name(folder.name + ".tmp")
    model.save_pretrained(tmp, max_shard_size="4GB")
    tokenizer.save_pretrained(tmp)
    tmp.replace(folder)
    del model
    free()
    log(f"built and saved {shape} in {time.time() - t:.0f}s")
    return folder
