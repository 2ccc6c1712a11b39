"""Tiny random models of real architectures, with offline tokenizers and real chat templates.

Tests and the quickstart need models without a network. `build_tiny` writes a folder that looks exactly
like a checkpoint from the hub (config.json, model.safetensors, tokenizer.json, tokenizer_config.json
with a chat template, generation_config.json), so everything downstream loads it through the same
`from_pretrained` path a real model takes. Each family copies the traits that break fine-tuning tools:
Llama 3 has no pad token and a BOS in its template; Qwen2 has no BOS, qkv biases and pad != eos;
Mistral folds the system prompt into the first [INST]; Gemma ties its embeddings and has a pad token.

The tokenizer is a byte-level BPE trained on a small bundled corpus, so token boundaries do not line up
with characters (as in real models), and it is deterministic: the same call gives the same files.

`build_tiny_arch` is the other way round: a tiny random model of a real architecture (`ARCHS`: Llama,
Qwen2, Qwen3, Mistral, Gemma 2, Gemma 3 text, Phi-3, DeepSeek-V3) around an existing tokenizer folder,
typically a model family's real tokenizer. The tokenizer files are copied unchanged and the config takes
its vocabulary size and special-token ids from the tokenizer, so the folder loads like a hub checkpoint
of that family, real vocabulary and chat template included, while the network stays tiny (hidden size
64, 2 layers) even at a 262k vocabulary.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import torch

from loratune.data.templates import TEMPLATES


@dataclass(frozen=True)
class Family:
    """What distinguishes one tiny family: its HF config class, specials and chat template."""

    model_type: str
    template: str
    bos: str | None
    eos: str
    pad: str | None
    unk: str | None
    extra_specials: tuple[str, ...] = ()
    config_extra: dict = field(default_factory=dict)


FAMILIES: dict[str, Family] = {
    "llama": Family(
        "llama", "llama3", bos="<|begin_of_text|>", eos="<|eot_id|>", pad=None, unk=None,
        extra_specials=("<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>"),
        config_extra={"rope_theta": 500000.0},
    ),
    "qwen2": Family(
        "qwen2", "chatml", bos=None, eos="<|im_end|>", pad="<|endoftext|>", unk=None,
        extra_specials=("<|im_start|>",),
    ),
    "mistral": Family("mistral", "mistral", bos="<s>", eos="</s>", pad=None, unk="<unk>"),
    "gemma": Family(
        "gemma", "gemma", bos="<bos>", eos="<eos>", pad="<pad>", unk="<unk>",
        extra_specials=("<start_of_turn>", "<end_of_turn>"),
        config_extra={"tie_word_embeddings": True, "head_dim": 16},
    ),
}

# Shapes: "test" is as small as the architectures allow while keeping GQA (4 heads, 2 KV heads);
# "demo" is large enough to memorise the quickstart data in a minute of CPU time.
SIZES: dict[str, dict] = {
    "test": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
             "num_attention_heads": 4, "num_key_value_heads": 2, "vocab": 512},
    "demo": {"hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 4,
             "num_attention_heads": 8, "num_key_value_heads": 4, "vocab": 1024},
}


def _corpus() -> list[str]:
    text = resources.files("loratune.model").joinpath("tiny_corpus.txt").read_text(encoding="utf-8")
    return [line for line in text.splitlines() if line and not line.startswith("# ")]


def _specials(fam: Family) -> list[str]:
    names = [fam.bos, fam.eos, fam.pad, fam.unk, *fam.extra_specials]
    return list(dict.fromkeys(n for n in names if n))  # keep order, drop None and duplicates


def build_tokenizer(family: str, vocab_size: int):
    """Train a deterministic byte-level BPE tokenizer with `family`'s special tokens and chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    fam = FAMILIES[family]
    specials = _specials(fam)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(_corpus(), trainer)
    if fam.bos:  # models with a BOS add it when encoding plain text, as Llama/Mistral/Gemma do
        bos_id = tok.token_to_id(fam.bos)
        tok.post_processor = processors.TemplateProcessing(
            single=f"{fam.bos} $A", pair=f"{fam.bos} $A {fam.bos} $B", special_tokens=[(fam.bos, bos_id)]
        )
    kwargs = {k: v for k, v in (("bos_token", fam.bos), ("eos_token", fam.eos), ("pad_token", fam.pad),
                                ("unk_token", fam.unk)) if v}
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, extra_special_tokens=list(fam.extra_specials), **kwargs)
    hf.chat_template = TEMPLATES[fam.template].jinja
    return hf


def build_tiny(family: str, out_dir: str | Path, size: str = "test", seed: int = 0) -> Path:
    """Write a tiny random `family` model with its tokenizer to `out_dir`; returns the folder.

    The weights depend only on (family, size, seed), so a folder can be rebuilt identically anywhere.
    """
    from transformers import AutoConfig, GenerationConfig

    if family not in FAMILIES:
        raise ValueError(f"unknown tiny family {family!r}; known: {', '.join(FAMILIES)}")
    fam, shape = FAMILIES[family], dict(SIZES[size])
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(family, shape.pop("vocab"))
    ids = {name: tokenizer.convert_tokens_to_ids(name) for name in _specials(fam)}
    config = AutoConfig.for_model(
        fam.model_type, vocab_size=len(tokenizer), max_position_embeddings=2048,
        bos_token_id=ids.get(fam.bos), eos_token_id=ids[fam.eos], pad_token_id=ids.get(fam.pad),
        **shape, **fam.config_extra,
    )
    model = _random_model(config, seed)
    model.generation_config = GenerationConfig(
        bos_token_id=ids.get(fam.bos), eos_token_id=ids[fam.eos], pad_token_id=ids.get(fam.pad)
    )
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    (out / "loratune_tiny.json").write_text(json.dumps({"family": family, "size": size, "seed": seed}))
    return out


def _random_model(config, seed: int):
    """A float32 model of `config` whose weights depend only on `seed`."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():  # the default init is tiny; a wider spread gives a non-trivial random model
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.05)
    return model


@dataclass(frozen=True)
class Arch:
    """A real architecture at tiny size: its HF model_type and the config keys that keep its traits."""

    model_type: str
    config_extra: dict = field(default_factory=dict)


# Two layers so that alternating patterns show (Gemma's sliding/full attention, DeepSeek-V3's dense first
# layer then a mixture-of-experts layer); head_dim 16 = hidden 64 / 4 heads where the default is larger.
_GEMMA_TRAITS = {"head_dim": 16, "query_pre_attn_scalar": 16, "sliding_window": 16,
                 "layer_types": ["sliding_attention", "full_attention"]}
ARCHS: dict[str, Arch] = {
    "llama": Arch("llama"),
    "qwen2": Arch("qwen2"),  # q/k/v biases
    "qwen3": Arch("qwen3", {"head_dim": 16}),  # q/k norms
    "mistral": Arch("mistral"),
    "gemma2": Arch("gemma2", {**_GEMMA_TRAITS, "final_logit_softcapping": 30.0, "attn_logit_softcapping": 50.0}),
    "gemma3": Arch("gemma3_text", _GEMMA_TRAITS),  # Gemma3ForCausalLM: q/k norms, tied embeddings
    "phi3": Arch("phi3"),  # fused qkv_proj and gate_up_proj
    "deepseek_v3": Arch("deepseek_v3", {  # multi-head latent attention, shared + routed experts
        "num_key_value_heads": 4, "q_lora_rank": 32, "kv_lora_rank": 16, "qk_rope_head_dim": 8,
        "qk_nope_head_dim": 8, "v_head_dim": 16, "moe_intermediate_size": 32, "n_routed_experts": 4,
        "n_shared_experts": 1, "num_experts_per_tok": 2, "n_group": 1, "topk_group": 1, "first_k_dense_replace": 1,
    }),
}
ARCH_SHAPE: dict = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                    "num_attention_heads": 4, "num_key_value_heads": 2}
# What a tokenizer folder may hold; copied as is (other files, e.g. a fetcher's stamp, are left behind).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "chat_template.jinja", "chat_template.json", "tokenizer.model")


def build_tiny_arch(arch: str, tokenizer_dir: str | Path, out_dir: str | Path, seed: int = 0) -> Path:
    """Write a tiny random `arch` model around the tokenizer in `tokenizer_dir` to `out_dir`; returns the folder.

    The tokenizer files are copied byte for byte; vocab_size is len(tokenizer) and the bos/eos/pad ids are
    the tokenizer's, so `AutoModelForCausalLM.from_pretrained` and `AutoTokenizer.from_pretrained` load the
    folder as they load that family's checkpoint. The weights depend only on (arch, tokenizer, seed).
    """
    from transformers import AutoConfig, AutoTokenizer, GenerationConfig

    if arch not in ARCHS:
        raise ValueError(f"unknown tiny architecture {arch!r}; known: {', '.join(ARCHS)}")
    src = Path(tokenizer_dir)
    if not (src / "tokenizer.json").is_file() and not (src / "tokenizer.model").is_file():
        raise ValueError(f"{src} holds no tokenizer.json or tokenizer.model")
    tokenizer = AutoTokenizer.from_pretrained(src)
    spec = ARCHS[arch]
    ids = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
           "pad_token_id": tokenizer.pad_token_id}
    config = AutoConfig.for_model(spec.model_type, vocab_size=len(tokenizer), max_position_embeddings=2048,
                                  **ids, **{**ARCH_SHAPE, **spec.config_extra})
    model = _random_model(config, seed)
    model.generation_config = GenerationConfig(**ids)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copyfile(src / name, out / name)
    (out / "loratune_tiny.json").write_text(json.dumps({"arch": arch, "tokenizer": str(src), "seed": seed}))
    return out
