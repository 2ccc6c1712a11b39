"""Tiny random checkpoints of every family loratune's decoder owns, each with the traits that set it apart.

Each is written to a folder like a hub checkpoint (config.json + model.safetensors, from transformers'
own config classes) and loaded back through `loratune.model.load.load_base`, the path real models take.
The traits exercised: Llama 3.1's llama3 RoPE scaling; Mistral's sliding window on every layer; Qwen2's
q/k/v biases and a windowed second layer; Qwen3's q/k norms with yarn RoPE; Gemma's embedding scale and
(1 + w) norms with GeGLU; Gemma 2's sandwich norms, soft-caps, query_pre_attn_scalar and sliding/global
alternation; Gemma 3's q/k norms and one RoPE per layer type (linear scaling on the global layers), also as
the text decoder beside a vision tower (`gemma3mm`, model_type gemma3, Gemma 3 4B and up);
Phi-3's fused qkv/gate_up, partial rotary dims, longrope and a sliding window. Windows are a few tokens,
so the short test samples cross them. Weights are drawn wider than transformers' init so that every
path changes the logits visibly (logits of order 1).
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch

SHAPE = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
         "num_key_value_heads": 2, "vocab_size": 97, "max_position_embeddings": 64,
         "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}
_GEMMA = {"head_dim": 16, "query_pre_attn_scalar": 16, "sliding_window": 4,
          "layer_types": ["sliding_attention", "full_attention"]}
FAMILIES: dict[str, tuple[str, dict]] = {
    "llama": ("llama", {"rope_parameters": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                            "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                            "original_max_position_embeddings": 16}}),
    "mistral": ("mistral", {"sliding_window": 5}),
    "qwen2": ("qwen2", {"use_sliding_window": True, "sliding_window": 4, "max_window_layers": 1}),
    "qwen3": ("qwen3", {"head_dim": 16, "rope_parameters": {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                                                            "original_max_position_embeddings": 16}}),
    "gemma": ("gemma", {"head_dim": 16}),
    "gemma2": ("gemma2", {**_GEMMA, "attn_logit_softcapping": 5.0, "final_logit_softcapping": 3.0}),
    "gemma3": ("gemma3_text", {**_GEMMA, "rope_parameters": {
        "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
        "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1000000.0}}}),
    "gemma3mm": ("gemma3", {**_GEMMA}),
    "phi3": ("phi3", {"sliding_window": 6, "original_max_position_embeddings": 8, "rope_parameters": {
        "rope_type": "longrope", "rope_theta": 10000.0, "partial_rotary_factor": 0.5,
        "short_factor": [1.0, 1.1, 1.2, 1.3], "long_factor": [2.0, 3.0, 4.0, 5.0]}}),
}
NAMES = list(FAMILIES)
# sample lengths that cross every window above, and Phi-3's longrope switch (12 > 8 tokens)
LENGTHS = (7, 12, 3)


def hf_config(name: str):
    from transformers import AutoConfig

    model_type, extra = FAMILIES[name]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if model_type == "gemma3":  # the text decoder's config inside, a one-layer vision tower beside it
            vision = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
                      "image_size": 28, "patch_size": 14}
            return AutoConfig.for_model(model_type, text_config={**SHAPE, **extra}, vision_config=vision,
                                        mm_tokens_per_image=4)
        return AutoConfig.for_model(model_type, **{**SHAPE, **extra})


def write_checkpoint(name: str, folder: Path, seed: int = 0) -> Path:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(hf_config(name), dtype=torch.float32)
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.08)
            elif "norm" in pname:  # Llama form: w near 1; Gemma form stores w - 1: near 0
                p.copy_(torch.randn_like(p) * 0.1 + (0.0 if name.startswith("gemma") else 1.0))
            else:  # biases
                p.normal_(0.0, 0.1)
    model.save_pretrained(folder)
    return folder


def run_config(folder: Path, *overrides: str):
    """A loratune Config for the tiny checkpoint: fp32 base, eager attention for the HF reference, LoRA r=4."""
    from loratune.config import load_config

    return load_config(None, [f"model.path={folder}", "quantization.bits=32", "model.attn_implementation=eager",
                              "adapter.rank=4", "adapter.alpha=8", "adapter.dropout=0", *overrides])


def sample_ids(lengths=LENGTHS, seed: int = 1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, SHAPE["vocab_size"], (n,), generator=g) for n in lengths]


def load_pair(cfg, attention: str = "sdpa"):
    """(HF model as loratune loads it, our decoder over the same tensors), both in eval mode."""
    from loratune.decoder import decoder_from_hf
    from loratune.model.load import load_base

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf = load_base(cfg).eval()
    return hf, decoder_from_hf(hf, attention=attention).eval()


def hf_logits(model, ids: list[torch.Tensor]) -> torch.Tensor:
    """Each sample run alone through a transformers (or peft) model, logits laid end to end [N, V]."""
    return torch.cat([model(input_ids=i[None]).logits[0] for i in ids])


def attach_random_lora(decoder, peft_model, seed: int = 0, scale_b: float = 0.3) -> None:
    """Random non-zero A and B on every adapted layer of our decoder, copied into peft's layers of the same
    (HF) name, so both compute the same adapted model."""
    g = torch.Generator().manual_seed(seed)
    modules = dict(peft_model.named_modules())
    for name, layer in decoder.adapted_layers().items():
        a = torch.randn(layer.lora_A.shape, generator=g) * 0.2
        b = torch.randn(layer.lora_B.shape, generator=g) * scale_b
        layer.set_adapter_weights(a, b)
        theirs = modules["base_model.model." + decoder.hf_name(name)]
        with torch.no_grad():
            theirs.lora_A["default"].weight.copy_(a)
            theirs.lora_B["default"].weight.copy_(b)
