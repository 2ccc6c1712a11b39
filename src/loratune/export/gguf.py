"""Write a merged export as one GGUF file (llama.cpp, Ollama, LM Studio) with the `gguf` package's writer.

Input: the folder `loratune export` writes (safetensors, config.json, tokenizer with its chat template). The
architecture's facts come from the transformers config through `loratune.decoder.config.decoder_config`, the
same reading the decoder trains with; `ARCHS` says, per `model_type`, which llama.cpp architecture computes
that model and how its tensors are laid out there:
- Llama and Mistral run as llama.cpp's `llama`, whose RoPE rotates adjacent pairs of each head, where
  transformers rotates its two halves: q and k rows are permuted into llama.cpp's order (the attention
  scores are unchanged, so the logits are);
- Qwen2 (`qwen2`, q/k/v biases), Gemma (`gemma`) and Gemma 2 (`gemma2`) rotate halves, as transformers
  does: no permutation;
- Gemma's norms compute x * (1 + w) where llama.cpp's compute x * w: the stored w gets + 1; the embedding
  scale sqrt(hidden) and the tied head are llama.cpp's own for `gemma`; Gemma 2 adds its sandwich norms,
  attention and final soft-caps and the sliding window of its even layers.
RoPE scaling goes in as llama.cpp defines it: linear and YaRN as `rope.scaling.*` keys, Llama 3.1's
llama3 scaling as the `rope_freqs` tensor of per-frequency divisors. Dynamic NTK and longrope have no
llama.cpp form and are refused. A sliding window (Mistral) is not applied by llama.cpp's `llama`; it is
named in a warning when the context is longer than the window.

Tensors are read one at a time from the safetensors files and encoded (`loratune.export.gguf_quant`) as
they are added; the tokenizer comes from `loratune.export.gguf_vocab`.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from loratune.export.gguf_quant import KINDS, encode, tensor_type
from loratune.export.gguf_vocab import read_vocab
from loratune.export.merge import ExportError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Arch:
    """How one transformers `model_type` is laid out in llama.cpp."""

    name: str  # llama.cpp's architecture
    permute_qk: bool  # rows of q/k reordered from rotate-half pairs to adjacent pairs
    norm_plus_one: bool  # Gemma: stored norm weight w means (1 + w)
    sandwich: bool = False  # Gemma 2: norms after attention and around the MLP, soft-caps, alternating windows


ARCHS = {
    "llama": Arch("llama", permute_qk=True, norm_plus_one=False),
    "mistral": Arch("llama", permute_qk=True, norm_plus_one=False),
    "qwen2": Arch("qwen2", permute_qk=False, norm_plus_one=False),
    "gemma": Arch("gemma", permute_qk=False, norm_plus_one=True),
    "gemma2": Arch("gemma2", permute_qk=False, norm_plus_one=True, sandwich=True),
}

LAYER_TENSORS = {
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
}
GLOBAL_TENSORS = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
                  "lm_head.weight": "output.weight"}
FILE_TYPES = {"f16": "MOSTLY_F16", "q8_0": "MOSTLY_Q8_0", "q4_K": "MOSTLY_Q4_K_M"}


@dataclass
class GgufInfo:
    path: str
    kind: str
    arch: str
    tensors: int
    bytes: int
    types: dict[str, int]  # GGML type name -> how many tensors
    bos_id: int | None
    eos_id: int | None
    add_bos: bool
    warnings: list[str]


SANDWICH_TENSORS = {**LAYER_TENSORS, "post_attention_layernorm": "post_attention_norm",
                    "pre_feedforward_layernorm": "ffn_norm", "post_feedforward_layernorm": "post_ffw_norm"}


def gguf_name(hf_name: str, sandwich: bool = False) -> str | None:
    """llama.cpp's name of a transformers tensor (None: not part of the GGUF)."""
    if hf_name in GLOBAL_TENSORS:
        return GLOBAL_TENSORS[hf_name]
    table = SANDWICH_TENSORS if sandwich else LAYER_TENSORS
    parts = hf_name.split(".")
    if len(parts) >= 5 and parts[0] == "model" and parts[1] == "layers":
        module, leaf = ".".join(parts[3:-1]), parts[-1]
        if module in table and leaf in ("weight", "bias"):
            return f"blk.{parts[2]}.{table[module]}.{leaf}"
    return None


def _sandwich_keys(w, dc: Any, warnings: list[str]) -> None:
    """Gemma 2's soft-caps and sliding window; llama.cpp's gemma2 slides on even layers and scales queries by
    1/sqrt(head_dim) (by 1/sqrt(hidden/heads) for its 27B shape), so other layouts are refused."""
    if dc.attn_softcap:
        w.add_attn_logit_softcapping(dc.attn_softcap)
    if dc.final_softcap:
        w.add_final_logit_softcapping(dc.final_softcap)
    windows = {x for x in dc.windows if x is not None}
    if windows:
        if len(windows) > 1 or any((x is not None) != (i % 2 == 0) for i, x in enumerate(dc.windows)):
            raise ExportError("llama.cpp's gemma2 slides its attention window on even layers only; this model's "
                              f"layer_types/sliding_window differ ({dc.windows})")
        w.add_sliding_window(windows.pop())
    if not math.isclose(dc.attn_scale, dc.head_dim ** -0.5, rel_tol=1e-6):
        raise ExportError(f"query_pre_attn_scalar gives a query scale of {dc.attn_scale:.6g}; llama.cpp's gemma2 "
                          f"scales by 1/sqrt(head_dim) = {dc.head_dim ** -0.5:.6g} at this shape")


def permute_rows(w: torch.Tensor, heads: int) -> torch.Tensor:
    """Rows of a q or k projection (weight or bias) from transformers' rotate-half order to llama.cpp's
    adjacent pairs, per head: [x0..x(d/2-1), y0..] -> [x0, y0, x1, y1, ...]."""
    shape = w.shape
    return w.reshape(heads, 2, shape[0] // heads // 2, *shape[1:]).swapaxes(1, 2).reshape(shape)


def llama3_rope_factors(rc: Any) -> np.ndarray:
    """Llama 3.1's RoPE scaling as llama.cpp's `rope_freqs` divisors, one per frequency."""
    dim, theta = rc.rotary_dim, rc.theta
    freqs = 1.0 / (theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim))
    old = rc.original_max_position
    low_wavelen, high_wavelen = old / rc.low_freq_factor, old / rc.high_freq_factor
    factors = []
    for f in freqs:
        wavelen = 2 * math.pi / f
        if wavelen < high_wavelen:
            factors.append(1.0)
        elif wavelen > low_wavelen:
            factors.append(rc.factor)
        else:
            smooth = (old / wavelen - rc.low_freq_factor) / (rc.high_freq_factor - rc.low_freq_factor)
            factors.append(1.0 / ((1 - smooth) / rc.factor + smooth))
    return np.asarray(factors, dtype=np.float32)


def _tensors(folder: Path):
    """(name, tensor) of every safetensors file of `folder`, one tensor loaded at a time."""
    from safetensors import safe_open

    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ExportError(f"{folder} holds no .safetensors files to convert")
    for f in files:
        with safe_open(str(f), framework="pt") as st:
            for name in st.keys():
                yield name, st.get_tensor(name)


def _add_rope(w, arch: Arch, rc, hf: Any, warnings: list[str]):
    """RoPE keys (and for llama3 the tensor of divisors, returned) in llama.cpp's terms."""
    from gguf import RopeScalingType

    w.add_rope_freq_base(rc.theta)
    w.add_rope_dimension_count(rc.rotary_dim)
    if rc.kind == "default":
        return None
    if rc.kind == "linear":
        w.add_rope_scaling_type(RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(rc.factor)
        return None
    if rc.kind == "yarn":
        w.add_rope_scaling_type(RopeScalingType.YARN)
        w.add_rope_scaling_factor(rc.factor)
        w.add_rope_scaling_orig_ctx_len(rc.original_max_position)
        w.add_rope_scaling_yarn_beta_fast(rc.beta_fast)
        w.add_rope_scaling_yarn_beta_slow(rc.beta_slow)
        default = 0.1 * math.log(rc.factor) + 1.0
        if not math.isclose(rc.attention_factor, default, rel_tol=1e-6):
            w.add_rope_scaling_attn_factors(rc.attention_factor / default)
        return None
    if rc.kind == "llama3":
        if arch.name != "llama":
            raise ExportError(f"llama3 RoPE scaling on a {hf.model_type} model has no llama.cpp form")
        return llama3_rope_factors(rc)
    raise ExportError(f"RoPE {rc.kind!r} (config.json rope_parameters) has no llama.cpp form; GGUF export "
                      "supports default, linear, yarn and llama3 RoPE")


def convert(folder: str | Path, out: str | Path, kind: str, *, name: str = "", chat_template: str | None = None,
            eot_id: int | None = None) -> GgufInfo:
    """Write the model saved in `folder` to the GGUF file `out` with weights in `kind` (f16, q8_0, q4_K).
    `chat_template`: the template to embed (default: the saved tokenizer's); `eot_id`: the end-of-turn token
    when it is not the eos token."""
    import gguf
    from transformers import AutoConfig, AutoTokenizer

    from loratune.decoder.config import decoder_config

    if kind not in KINDS:
        raise ExportError(f"--gguf {kind!r}: choose one of {', '.join(KINDS)}")
    folder, out = Path(folder), Path(out)
    hf = AutoConfig.from_pretrained(folder)
    arch = ARCHS.get(hf.model_type)
    if arch is None:
        raise ExportError(f"GGUF export covers model_type {', '.join(ARCHS)}; this model is {hf.model_type!r}")
    dc = decoder_config(hf)
    rc = dc.rope[0]
    warnings: list[str] = []
    windows = {w for w in dc.windows if w is not None}
    context = int(hf.max_position_embeddings)
    if windows and min(windows) < context and not arch.sandwich:
        warnings.append(f"the model attends within a sliding window of {min(windows)} tokens; llama.cpp's {arch.name} "
                        f"attends to the whole context (up to {context}), so prompts longer than the window differ")
    tok = AutoTokenizer.from_pretrained(folder)
    vocab = read_vocab(tok, folder, dc.vocab_size)
    probe = tok("a").input_ids
    add_bos = tok.bos_token_id is not None and bool(probe) and probe[0] == tok.bos_token_id

    w = gguf.GGUFWriter(str(out), arch.name)
    w.add_name(name or folder.name)
    w.add_file_type(getattr(gguf.LlamaFileType, FILE_TYPES[kind]))
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    w.add_context_length(context)
    w.add_embedding_length(dc.hidden_size)
    w.add_block_count(dc.num_layers)
    w.add_feed_forward_length(dc.intermediate_size)
    w.add_head_count(dc.num_heads)
    w.add_head_count_kv(dc.num_kv_heads)
    w.add_key_length(dc.head_dim)
    w.add_value_length(dc.head_dim)
    w.add_layer_norm_rms_eps(dc.rms_norm_eps)
    w.add_vocab_size(dc.vocab_size)
    rope_freqs = _add_rope(w, arch, rc, hf, warnings)
    if arch.sandwich:
        _sandwich_keys(w, dc, warnings)

    w.add_tokenizer_model(vocab.model)
    if vocab.pre is not None:
        w.add_tokenizer_pre(vocab.pre)
    w.add_token_list(vocab.tokens)
    w.add_token_types(vocab.types)
    if vocab.scores is not None:
        w.add_token_scores(vocab.scores)
    if vocab.merges:
        w.add_token_merges(vocab.merges)
    if vocab.add_space_prefix is not None:
        w.add_add_space_prefix(vocab.add_space_prefix)
    for setter, value in ((w.add_bos_token_id, tok.bos_token_id), (w.add_eos_token_id, tok.eos_token_id),
                          (w.add_unk_token_id, tok.unk_token_id), (w.add_pad_token_id, tok.pad_token_id),
                          (w.add_eot_token_id, eot_id)):
        if value is not None:
            setter(int(value))
    w.add_add_bos_token(add_bos)
    w.add_add_eos_token(False)
    template = chat_template if chat_template is not None else tok.chat_template
    if template:
        w.add_chat_template(template)

    counts: dict[str, int] = {}
    total = 0

    def add(gname: str, data: np.ndarray) -> None:
        nonlocal total
        qtype = tensor_type(kind, gname, data.shape)
        encoded = encode(data, qtype)
        w.add_tensor(gname, encoded, raw_dtype=qtype)
        counts[qtype.name] = counts.get(qtype.name, 0) + 1
        total += encoded.nbytes

    if rope_freqs is not None:
        add("rope_freqs.weight", rope_freqs)
    seen = set()
    for hf_name, t in _tensors(folder):
        gname = gguf_name(hf_name, arch.sandwich)
        if gname is None:
            raise ExportError(f"{folder}: tensor {hf_name!r} has no place in a llama.cpp {arch.name} model")
        if gname == "output.weight" and dc.tie_embeddings:
            continue
        t = t.float()
        if arch.permute_qk and ".attn_q." in gname:
            t = permute_rows(t, dc.num_heads)
        elif arch.permute_qk and ".attn_k." in gname:
            t = permute_rows(t, dc.num_kv_heads)
        if arch.norm_plus_one and gname.endswith("norm.weight"):
            t = t + 1.0
        add(gname, t.numpy())
        seen.add(gname)
    if "output.weight" not in seen and not dc.tie_embeddings:
        raise ExportError(f"{folder}: the model has an untied output head but no lm_head.weight")

    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    for message in warnings:
        log.warning(message)
    return GgufInfo(str(out), kind, arch.name, sum(counts.values()), out.stat().st_size, counts,
                    tok.bos_token_id, tok.eos_token_id, add_bos, warnings)


def info_json(info: GgufInfo) -> str:
    return json.dumps(info.__dict__, indent=2)
