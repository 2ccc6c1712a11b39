"""GGUF export: the file as llama.cpp reads it (names, shapes, metadata, vocabulary), our Q4_K against the
`gguf` package's dequantizer, RoPE scaling in llama.cpp's terms, the Ollama Modelfile's template; and, where
llama-cpp-python is installed, llama.cpp's logits against the merged model's for each family.

The files are read back with `gguf.GGUFReader` (the package llama.cpp's own tools use) and dequantized
with `gguf.quants.dequantize`, independently of the writer.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, GGUFReader, quants

from loratune.data.templates import TEMPLATES, render_text
from loratune.export.merge import ExportError
from loratune.export.gguf import convert, llama3_rope_factors, permute_rows
from loratune.export.gguf_quant import quantize_q4_k
from loratune.export.modelfile import measure, modelfile

FAMILIES = ["llama", "qwen2", "mistral", "gemma"]
ARCH = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "gemma": "gemma"}


def _field(reader: GGUFReader, key: str):
    f = reader.fields[key]
    return f.contents()


def _tensor(reader: GGUFReader, name: str) -> np.ndarray:
    t = next(t for t in reader.tensors if t.name == name)
    return quants.dequantize(t.data, t.tensor_type).reshape([int(n) for n in reversed(t.shape)])


@pytest.fixture(scope="module")
def q8_files(tiny_models: dict[str, Path], tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("gguf")
    return {fam: convert(tiny_models[fam], root / f"{fam}.gguf", "q8_0").path for fam in FAMILIES}


@pytest.fixture(scope="module")
def models(tiny_models: dict[str, Path], tmp_path_factory) -> dict[str, Path]:
    """The tiny families, and a tiny Gemma 2 (soft-caps, sandwich norms, sliding window on even layers) around
    the tiny Gemma's tokenizer."""
    from loratune.model.tiny import build_tiny_arch

    gemma2 = build_tiny_arch("gemma2", tiny_models["gemma"], tmp_path_factory.mktemp("gemma2") / "gemma2")
    return {**tiny_models, "gemma2": gemma2}


def test_gemma2_layout(models, tmp_path):
    reader = GGUFReader(convert(models["gemma2"], tmp_path / "g2.gguf", "f16").path)
    assert _field(reader, "general.architecture") == "gemma2"
    assert _field(reader, "gemma2.attn_logit_softcapping") == 50.0
    assert _field(reader, "gemma2.final_logit_softcapping") == 30.0
    assert _field(reader, "gemma2.attention.sliding_window") == 16
    names = {t.name for t in reader.tensors}
    assert {"blk.1.post_attention_norm.weight", "blk.1.ffn_norm.weight", "blk.1.post_ffw_norm.weight"} <= names
    assert "output.weight" not in names  # tied


@pytest.fixture(scope="module")
def spm_llama(tmp_path_factory) -> Path:
    """A tiny Llama with a SentencePiece-style tokenizer (BPE with byte fallback, "▁" for spaces, as Llama 2's
    and Mistral's tokenizer.json), trained on the tiny corpus."""
    from tokenizers import Tokenizer, decoders, models, normalizers, processors, trainers
    from transformers import AutoConfig, PreTrainedTokenizerFast

    from loratune.data.templates import TEMPLATES
    from loratune.model.tiny import _corpus, _random_model

    tok = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>", fuse_unk=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    specials = ["<unk>", "<s>", "</s>"] + [f"<0x{i:02X}>" for i in range(256)]
    tok.train_from_iterator(_corpus(), trainers.BpeTrainer(vocab_size=700, special_tokens=specials,
                                                           show_progress=False))
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", 1)])
    hf_tok = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    hf_tok.chat_template = TEMPLATES["mistral"].jinja
    config = AutoConfig.for_model("llama", vocab_size=len(hf_tok), hidden_size=64, intermediate_size=128,
                                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                  max_position_embeddings=512, bos_token_id=1, eos_token_id=2)
    folder = tmp_path_factory.mktemp("spm") / "spm-llama"
    _random_model(config, seed=0).save_pretrained(folder)
    hf_tok.save_pretrained(folder)
    return folder


def test_sentencepiece_style_vocabulary(spm_llama, tmp_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(spm_llama)
    reader = GGUFReader(convert(spm_llama, tmp_path / "spm.gguf", "q8_0").path)
    assert _field(reader, "tokenizer.ggml.model") == "llama"
    assert _field(reader, "tokenizer.ggml.add_space_prefix") is True
    types = _field(reader, "tokenizer.ggml.token_type")
    scores = _field(reader, "tokenizer.ggml.scores")
    assert types[1] == types[2] == 3 and types[0] == 2  # <s>, </s> CONTROL; <unk> UNKNOWN
    assert all(types[i] == 6 for i in range(3, 259))  # <0x00>..<0xFF> BYTE
    normal = [i for i, t in enumerate(types) if t == 1]
    assert normal and all(scores[a] > scores[b] for a, b in zip(normal, normal[1:]))  # earlier pieces merge first
    assert _field(reader, "tokenizer.ggml.tokens")[:len(tok)] == tok.convert_ids_to_tokens(list(range(len(tok))))


def test_q4_k_blocks_decode_with_the_gguf_package():
    rng = np.random.default_rng(0)
    x = rng.normal(0.0, 0.05, (16, 512)).astype(np.float32)
    blocks = quantize_q4_k(x)
    assert blocks.dtype == np.uint8 and blocks.shape == (16, 2 * 144)
    back = quants.dequantize(blocks, GGMLQuantizationType.Q4_K)
    rel = float(np.sqrt(((back - x) ** 2).mean()) / x.std())
    assert rel < 0.09  # 4 bits per value: llama.cpp's own Q4_K is near 0.07 on Gaussian weights
    legacy = quants.dequantize(quants.quantize(x, GGMLQuantizationType.Q4_0), GGMLQuantizationType.Q4_0)
    assert rel < float(np.sqrt(((legacy - x) ** 2).mean()) / x.std())  # better than Q4_0 at the same 4 bits
    # values on a sub-block's grid come back exactly
    grid = np.tile(np.arange(16, dtype=np.float32) * 0.01 - 0.05, 16)[None, :]
    assert np.allclose(quants.dequantize(quantize_q4_k(grid), GGMLQuantizationType.Q4_K), grid, atol=2e-4)


@pytest.mark.parametrize("family", FAMILIES)
def test_tensors_and_metadata_as_llama_cpp_reads_them(family, tiny_models, q8_files):
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoTokenizer

    reader = GGUFReader(q8_files[family])
    hf = AutoConfig.from_pretrained(tiny_models[family])
    tok = AutoTokenizer.from_pretrained(tiny_models[family])
    arch = ARCH[family]
    assert _field(reader, "general.architecture") == arch
    assert _field(reader, f"{arch}.block_count") == hf.num_hidden_layers
    assert _field(reader, f"{arch}.attention.head_count") == hf.num_attention_heads
    assert _field(reader, f"{arch}.attention.head_count_kv") == hf.num_key_value_heads
    assert _field(reader, f"{arch}.context_length") == hf.max_position_embeddings
    assert math.isclose(_field(reader, f"{arch}.rope.freq_base"), hf.rope_parameters["rope_theta"])
    tokens = _field(reader, "tokenizer.ggml.tokens")
    assert tokens[:len(tok)] == tok.convert_ids_to_tokens(list(range(len(tok))))
    assert len(tokens) == hf.vocab_size
    # transformers' Qwen2 tokenizer class splits digits one by one (Qwen2's regex) whatever tokenizer.json says
    assert _field(reader, "tokenizer.ggml.model") == "gpt2"
    assert _field(reader, "tokenizer.ggml.pre") == ("qwen2" if family == "qwen2" else "gpt-2")
    types = _field(reader, "tokenizer.ggml.token_type")
    assert types[tok.eos_token_id] == 3  # CONTROL: matched only when special tokens are parsed
    assert _field(reader, "tokenizer.ggml.eos_token_id") == tok.eos_token_id
    assert _field(reader, "tokenizer.ggml.add_bos_token") == (tok.bos_token_id is not None)
    assert _field(reader, "tokenizer.chat_template") == tok.chat_template

    weights = load_file(tiny_models[family] / "model.safetensors")
    q = _tensor(reader, "blk.1.attn_q.weight")
    want_q = weights["model.layers.1.self_attn.q_proj.weight"]
    if arch == "llama":  # llama.cpp's llama rotates adjacent pairs: rows permuted per head
        want_q = permute_rows(want_q, hf.num_attention_heads)
    assert np.abs(q - want_q.numpy()).max() < 0.01 * float(want_q.abs().max())  # Q8_0 resolution
    norm = _tensor(reader, "blk.0.attn_norm.weight")
    want_norm = weights["model.layers.0.input_layernorm.weight"].numpy() + (1.0 if family == "gemma" else 0.0)
    assert np.array_equal(norm, want_norm)  # F32, exact
    names = {t.name for t in reader.tensors}
    assert ("output.weight" in names) == (not hf.tie_word_embeddings)
    assert ("blk.0.attn_q.bias" in names) == (family == "qwen2")


def test_permutation_turns_rotate_half_into_adjacent_pairs():
    """With rows permuted, llama.cpp's adjacent-pair rotation of q equals transformers' rotate-half of q."""
    heads, head_dim, hidden = 2, 8, 16
    w = torch.randn(heads * head_dim, hidden)
    x = torch.randn(hidden)
    angle = torch.rand(head_dim // 2) * 3
    cos, sin = angle.cos(), angle.sin()
    q = (w @ x).reshape(heads, head_dim)
    a, b = q[:, : head_dim // 2], q[:, head_dim // 2:]
    theirs = torch.cat([a * cos - b * sin, b * cos + a * sin], dim=-1)  # rotate_half
    p = (permute_rows(w, heads) @ x).reshape(heads, head_dim // 2, 2)
    ours = torch.stack([p[..., 0] * cos - p[..., 1] * sin, p[..., 1] * cos + p[..., 0] * sin], dim=-1)
    # the same numbers, in llama.cpp's order: pair i is (x_i, x_{i + d/2})
    assert torch.allclose(ours.reshape(heads, head_dim // 2, 2).transpose(1, 2).reshape(heads, head_dim), theirs,
                          atol=1e-6)


def test_rope_scaling_in_llama_cpp_terms(tmp_path, quiet_warnings):
    from transformers import AutoConfig, AutoModelForCausalLM

    from loratune.decoder.config import decoder_config
    from loratune.decoder.rope import inverse_frequencies
    from loratune.model.tiny import build_tokenizer

    tok = build_tokenizer("llama", 300)
    params = {"llama3": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 64, "rope_theta": 500000.0},
              "linear": {"rope_type": "linear", "factor": 4.0, "rope_theta": 10000.0},
              "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64,
                       "rope_theta": 10000.0}}
    for kind, rope in params.items():
        hf = AutoConfig.for_model("llama", hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                  num_attention_heads=2, num_key_value_heads=1, vocab_size=len(tok),
                                  max_position_embeddings=256, rope_parameters=rope)
        folder = tmp_path / kind
        AutoModelForCausalLM.from_config(hf).save_pretrained(folder)
        tok.save_pretrained(folder)
        reader = GGUFReader(convert(folder, tmp_path / f"{kind}.gguf", "f16").path)
        if kind == "llama3":  # llama.cpp divides the plain frequencies by rope_freqs
            rc = decoder_config(hf).rope[0]
            plain = 1.0 / (rc.theta ** (np.arange(0, rc.rotary_dim, 2) / rc.rotary_dim))
            scaled, _ = inverse_frequencies(rc)
            assert np.allclose(plain / _tensor(reader, "rope_freqs.weight"), scaled.numpy(), rtol=1e-5)
            assert np.array_equal(_tensor(reader, "rope_freqs.weight"), llama3_rope_factors(rc))
        else:
            assert _field(reader, "llama.rope.scaling.type") == kind
            assert _field(reader, "llama.rope.scaling.factor") == 4.0
        if kind == "yarn":
            assert _field(reader, "llama.rope.scaling.original_context_length") == 64


@pytest.fixture
def quiet_warnings():
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


@pytest.mark.parametrize("name", list(TEMPLATES))
def test_modelfile_template_renders_as_the_chat_template(name, tiny_models):
    """The measured pieces re-render multi-turn chats exactly as the Jinja template does, or the template is
    reported as not reducible (Alpaca's and Vicuna's default system text)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_models["llama"])
    jinja = TEMPLATES[name].jinja
    fmt = measure(lambda m, g: render_text(tok, jinja, m, add_generation_prompt=g))
    if name in ("alpaca", "vicuna"):
        assert fmt is None
        return
    assert fmt is not None
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "2+2?"}]
    assert fmt.render(chat, True) == render_text(tok, jinja, chat, add_generation_prompt=True)
    assert (fmt.system is None) == (name in ("mistral", "gemma"))  # folded into the first user turn


def test_modelfile_text(tiny_models):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_models["llama"])
    fmt = measure(lambda m, g: render_text(tok, TEMPLATES["llama3"].jinja, m, add_generation_prompt=g))
    text = modelfile("run-q8_0.gguf", fmt=fmt, bos_text="<|begin_of_text|>", add_bos=True, stops=["<|eot_id|>"],
                     num_ctx=4096, source="outputs/run", parameters={"temperature": 0.7})
    assert "FROM ./run-q8_0.gguf\n" in text
    template = text.split('TEMPLATE """', 1)[1].split('"""', 1)[0]
    assert not template.startswith("<|begin_of_text|>")  # llama.cpp adds BOS itself
    assert template.startswith('{{ range .Messages }}{{ if eq .Role "system" }}<|start_header_id|>system')
    assert template.endswith("<|start_header_id|>assistant<|end_header_id|>\n\n")
    assert 'PARAMETER stop "<|eot_id|>"\n' in text and "PARAMETER num_ctx 4096\n" in text
    assert "PARAMETER temperature 0.7\n" in text
    mistral = measure(lambda m, g: render_text(tok, TEMPLATES["mistral"].jinja, m, add_generation_prompt=g))
    go = mistral.go_template()
    assert go.startswith('{{ $sys := "" }}') and "{{ if $sys }}{{ $sys }}\n\n{{ $sys = \"\" }}{{ end }}" in go


# ------------------------------------------------------------------------------ llama.cpp itself

def _needs_llama_cpp():
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (pip install 'loratune[gguf]')")


@pytest.mark.parametrize("family", FAMILIES + ["gemma2"])
@pytest.mark.parametrize("kind", ["f16", "q8_0"])
def test_llama_cpp_logits_follow_the_model(family, kind, models, tmp_path):
    """llama.cpp (llama-cpp-python) on the GGUF against transformers on the same folder: top-1 agreement at
    every position of the probes (f16 >= 99%, q8_0 >= 95%) and the same token ids for the probe texts."""
    _needs_llama_cpp()
    import shutil

    from loratune.export.gguf_export import export_gguf

    folder = tmp_path / family
    shutil.copytree(models[family], folder)
    report = export_gguf(folder, kind, stops=[], source="test")
    assert report.checked
    assert report.tokenizer_same == report.tokenizer_total == 6
    assert report.agreement.top1 >= (0.99 if kind == "f16" else 0.95)
    # llama.cpp computes the model the file holds (its q8_0 products round the activations to 8 bits too)
    assert report.faithful.top1 >= (0.99 if kind == "f16" else 0.95)
    assert report.agreement.positions > 100


def test_llama_cpp_sentencepiece_tokenizer_and_logits(spm_llama, tmp_path):
    """The SentencePiece-style vocabulary tokenizes in llama.cpp exactly as in transformers (byte fallback for
    characters outside the vocabulary, the space prefix), and the logits follow."""
    _needs_llama_cpp()
    import shutil

    from loratune.export.gguf_export import export_gguf

    folder = tmp_path / "spm"
    shutil.copytree(spm_llama, folder)
    report = export_gguf(folder, "f16", stops=[], source="test")
    assert report.tokenizer_same == report.tokenizer_total == 6
    assert report.agreement.top1 >= 0.99


def test_llama_cpp_q4_k_on_a_model_with_256_wide_rows(tmp_path):
    """Q4_K needs rows of 256 values: the demo-size model (hidden 256, MLP 512) gets Q4_K matrices. llama.cpp on
    the file computes the model those blocks hold: its logits follow transformers' on the same model with the
    weights read back from the GGUF (`load_gguf_weights`). Against the unquantized model the agreement is what
    4 bits leave of a random model's near-tied logits (printed; no threshold for q4_K by default)."""
    _needs_llama_cpp()
    from loratune.export.gguf_export import export_gguf
    from loratune.model.tiny import build_tiny

    folder = build_tiny("llama", tmp_path / "demo", size="demo")
    report = export_gguf(folder, "q4_K", stops=[], source="test")
    assert report.types.get("Q4_K", 0) == 4 * 7  # every layer matrix; embeddings and head stay Q8_0
    print(f"\nq4_K: llama.cpp vs the GGUF's weights {report.faithful.top1:.1%}; vs the unquantized model "
          f"{report.agreement.top1:.1%}")
    assert report.faithful.top1 >= 0.90  # llama.cpp rounds the activations of Q4_K products to 8 bits
    assert report.tokenizer_same == report.tokenizer_total
    with pytest.raises(ExportError, match="agrees with the merged model on"):  # a threshold asked for is kept
        export_gguf(folder, "q4_K", stops=[], source="test", min_agreement=0.99)
    assert not Path(report.gguf).exists()  # a failed check leaves no GGUF behind


@pytest.mark.parametrize("rope", [
    {"rope_type": "linear", "factor": 4.0},
    {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16},
    {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
     "original_max_position_embeddings": 16},
], ids=["linear", "yarn", "llama3"])
def test_llama_cpp_follows_rope_scaling(rope, tiny_models, tmp_path):
    """The tiny Llama with each RoPE scaling (pretraining length 16, so the probes run far past it): llama.cpp's
    logits on the f16 GGUF follow transformers'."""
    _needs_llama_cpp()
    import json
    import shutil

    from loratune.export.gguf_export import export_gguf

    folder = tmp_path / rope["rope_type"]
    shutil.copytree(tiny_models["llama"], folder)
    config = json.loads((folder / "config.json").read_text())
    config["rope_parameters"] = {**rope, "rope_theta": config["rope_parameters"]["rope_theta"]}
    if rope["rope_type"] == "yarn":  # the stretched context, as model.rope_scaling writes it
        config["max_position_embeddings"] = 16 * 4
    (folder / "config.json").write_text(json.dumps(config))
    report = export_gguf(folder, "f16", stops=[], source="test")
    assert report.agreement.top1 >= 0.99 and report.agreement.max_diff < 0.05
