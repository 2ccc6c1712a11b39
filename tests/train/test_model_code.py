"""Which model code trains (loratune's decoder, or transformers + peft as the fallback), decided once and said in
one line; the adapter the decoder writes is the PEFT adapter peft loads, with the same logits; a checkpoint
resumes only on the model code that wrote it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from train_helpers import config, write_run_yaml
from transformers import AutoConfig

from loratune.config import load_config
from loratune.decoder import Boundaries, load_adapter
from loratune.errors import ConfigError, LoratuneError, ModelError
from loratune.model.build import build_trainable
from loratune.model.load import load_base
from loratune.model.memory import load_model_config
from loratune.model.resolve import ENV, decide
from loratune.train.run import train


def _decide(tiny_llama: Path, *overrides: str, model_config=None):
    cfg = load_config(None, [f"model.path={tiny_llama}", *overrides])
    return decide(cfg, "cpu", model_config if model_config is not None else load_model_config(cfg))


def test_the_decoder_where_it_covers_the_run_else_transformers_with_the_reason(tiny_llama: Path, monkeypatch) -> None:
    monkeypatch.delenv(ENV, raising=False)
    r = _decide(tiny_llama)
    assert r.decoder and r.why == "model: loratune's decoder (llama)"
    assert (r.checkpointing, r.padding_free, r.batch_size, r.tokens_per_batch) == (True, True, 1, 1024)
    assert not r.graphs and not r.kernels and r.compute_dtype == torch.float32
    fallbacks = {"quantization.bits=8": "bits=8 (LLM.int8)", "adapter.dora=true": "adapter.dora=true",
                 "adapter.modules_to_save=[lm_head]": "modules_to_save",
                 "adapter.type=none": "full fine-tuning (adapter.type none)"}
    for override, reason in fallbacks.items():
        extra = ["quantization.bits=32"] if override == "adapter.type=none" else []
        r = _decide(tiny_llama, override, *extra)
        assert r.implementation == "transformers" and r.why.startswith("model: transformers + peft, the fallback: ")
        assert reason in r.why, (override, r.why)
    gpt2 = _decide(tiny_llama, model_config=AutoConfig.for_model("gpt2"))
    assert gpt2.implementation == "transformers" and "does not cover model_type 'gpt2'" in gpt2.why
    with pytest.raises(ModelError, match="model.implementation=loratune, but quantization.bits=8"):
        _decide(tiny_llama, "model.implementation=loratune", "quantization.bits=8")
    forced = _decide(tiny_llama, "model.implementation=transformers")
    assert forced.why == "model: transformers + peft (model.implementation=transformers)"
    r = _decide(tiny_llama, "train.batching=padded", "train.batch_size=4", "data.max_length=64")
    assert (r.padding_free, r.tokens) == (False, 256)
    r = _decide(tiny_llama, "train.tokens_per_batch=3000", "train.batch_size=4", "data.max_length=64")
    assert (r.padding_free, r.tokens) == (True, 3000)


def test_the_environment_replaces_auto_only(tiny_llama: Path, monkeypatch) -> None:
    monkeypatch.setenv(ENV, "transformers")
    assert _decide(tiny_llama).why == f"model: transformers + peft ({ENV}=transformers)"
    assert _decide(tiny_llama, "model.implementation=loratune").decoder  # the config's own choice wins
    monkeypatch.setenv(ENV, "peft")
    with pytest.raises(ConfigError, match=f"{ENV}='peft': expected one of loratune, transformers"):
        _decide(tiny_llama)


def test_a_too_small_token_budget_is_refused(tiny_llama: Path) -> None:
    with pytest.raises(ConfigError, match=r"train.tokens_per_batch must be auto or at least data.max_length \(128"):
        load_config(None, [f"model.path={tiny_llama}", "data.max_length=128", "train.tokens_per_batch=100"])


@pytest.mark.parametrize("impl", ["loratune", "transformers"])
def test_the_run_says_which_code_trains_in_one_line(tmp_path: Path, tiny_llama: Path, impl: str, capsys) -> None:
    train(config(write_run_yaml(tmp_path, tiny_llama), f"model.implementation={impl}", "train.max_steps=1"))
    printed = capsys.readouterr().out
    which = "loratune's decoder (llama)" if impl == "loratune" else "transformers + peft (model.implementation=transformers)"
    assert f"  model: {which}; padding-free micro-batches of up to 256 tokens\n" in printed


def test_the_decoders_adapter_loads_in_peft_with_the_same_logits(tmp_path: Path, tiny_llama: Path) -> None:
    """Trained on loratune's decoder (4-bit base), written as a PEFT adapter: peft on the transformers model
    loads it and computes the logits our decoder computes with it; its config is the one the transformers path
    writes for the same settings."""
    path = write_run_yaml(tmp_path, tiny_llama)
    cfg = config(path, "train.max_steps=4", "model.implementation=loratune")
    out = train(cfg).out_dir
    ids = torch.tensor([[1, 17, 93, 5, 260, 41, 8, 77]])
    with torch.no_grad():
        peft_model = PeftModel.from_pretrained(load_base(cfg), out).eval()
        theirs = peft_model(input_ids=ids).logits[0]
        ours_model = build_trainable(cfg, decide(cfg, "cpu", load_model_config(cfg))).module.eval()
        load_adapter(ours_model, out)
        ours = ours_model(ids[0], Boundaries.from_lengths([ids.shape[1]]))
        assert (ours - theirs).abs().max().item() < 3e-5  # 4-bit: bitsandbytes' dequantization vs ours
        with peft_model.disable_adapter():
            assert (peft_model(input_ids=ids).logits[0] - theirs).abs().max().item() > 1e-3  # it was applied

    hf = tmp_path / "hf"
    hf.mkdir()
    hf_out = train(config(write_run_yaml(hf, tiny_llama), "train.max_steps=1", "model.implementation=transformers"))
    ours_cfg, hf_cfg = (json.loads((d / "adapter_config.json").read_text()) for d in (out, hf_out.out_dir))
    for key in ("r", "lora_alpha", "lora_dropout", "target_modules", "use_rslora", "use_dora", "bias", "task_type",
                "peft_type", "base_model_name_or_path", "modules_to_save"):
        assert ours_cfg[key] == hf_cfg[key], key


def test_a_checkpoint_resumes_only_on_the_model_code_that_wrote_it(tmp_path: Path, tiny_llama: Path,
                                                                     monkeypatch) -> None:
    path = write_run_yaml(tmp_path, tiny_llama)
    monkeypatch.setenv(ENV, "transformers")
    monkeypatch.setenv("LORATUNE_FAULT", "term@step.end#4")
    assert train(config(path)).interrupted
    monkeypatch.delenv("LORATUNE_FAULT")
    monkeypatch.delenv(ENV)  # auto now resolves loratune's decoder
    with pytest.raises(LoratuneError, match="trained by the transformers model code, this run resolved loratune"):
        train(config(path))
    assert train(config(path, "model.implementation=transformers", "train.allow_config_change=true")).steps == 8


def test_model_kernels_false_runs_the_decoders_plain_pytorch_paths(tiny_llama: Path) -> None:
    """model.kernels is the decoder's Triton kernels (CUDA) on or off: off, every one of its modules and its loss
    take the plain-PyTorch path, the plan counts the plain MLP; the transformers fallback never has our kernels."""
    from loratune.decoder.lora import QLoRALinear
    from loratune.decoder.model import GatedMLP
    from loratune.decoder.norm import RMSNorm

    cfg = load_config(None, [f"model.path={tiny_llama}", "model.kernels=false", "adapter.rank=4"])
    decoder = build_trainable(cfg, decide(cfg, "cpu", load_model_config(cfg))).module
    switched = [m for m in decoder.modules() if isinstance(m, (RMSNorm, GatedMLP, QLoRALinear))]
    layers = decoder.config.num_layers
    assert len(switched) >= layers * (2 + 1 + 7) + 1 and not decoder.kernels and not any(m.kernels for m in switched)
    decoder.use_kernels(True)
    assert decoder.kernels and all(m.kernels for m in switched)
    assert not _decide(tiny_llama, "model.implementation=loratune").kernels  # on CPU: nothing to switch
    cuda = {k: decide(load_config(None, [f"model.path={tiny_llama}", f"model.kernels={k}"]), "cuda",
                      load_model_config(cfg)) for k in ("auto", "false")}
    assert (cuda["auto"].kernels, cuda["auto"].fused_mlp) == (True, True)
    assert (cuda["false"].kernels, cuda["false"].fused_mlp) == (False, False)
    hf = decide(load_config(None, [f"model.path={tiny_llama}", "model.implementation=transformers"]), "cuda",
                load_model_config(cfg))
    assert (hf.kernels, hf.fused_mlp, hf.graphs) == (False, False, False)
