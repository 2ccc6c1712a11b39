"""The methods of tests/methods on a CUDA GPU: LoftQ's factors against peft's own `replace_lora_weights_loftq`
(which needs CUDA), PiSSA's converted adapter on a bf16 base, NEFTune and EVA on the decoder's CUDA path.

Run on the GPU machine: `python -m pytest tests/methods/test_methods_gpu.py -q -m gpu`. Skipped without CUDA.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from train_helpers import write_run_yaml
from transformers import AutoModelForCausalLM

from loratune.config import load_config
from loratune.model.build import build_trainable
from loratune.model.memory import load_model_config
from loratune.model.resolve import decide

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
              pytest.mark.usefixtures("exact_cuda_matmuls")]

IDS = torch.tensor([[5, 9, 14, 3, 7, 11, 4, 8, 21, 30]])


def _build(folder: Path, *overrides: str):
    cfg = load_config(None, [f"model.path={folder}", "adapter.rank=4", "adapter.alpha=4", "adapter.dropout=0",
                             *overrides])
    torch.manual_seed(0)
    return build_trainable(cfg, decide(cfg, "cuda", load_model_config(cfg)))


def test_loftq_equals_pefts_replacement_at_scale_one(tiny_llama: Path) -> None:
    """alpha = r (scale 1), where peft's replacement (B A = the error) and ours (s B A = the error) coincide."""
    from peft.utils.loftq_utils import replace_lora_weights_loftq

    theirs = _build(tiny_llama, "adapter.init=default", "model.implementation=transformers").module
    replace_lora_weights_loftq(theirs, model_path=str(tiny_llama))
    ours = _build(tiny_llama, "adapter.init=loftq", "model.implementation=loratune").module
    for our_name, hf in (("layers.0.attn.q_proj", "model.layers.0.self_attn.q_proj"),
                         ("layers.1.mlp.down_proj", "model.layers.1.mlp.down_proj")):
        m = ours.get_submodule(our_name)
        p = theirs.get_submodule("base_model.model." + hf)
        torch.testing.assert_close(m.lora_B @ m.lora_A, p.lora_B["default"].weight @ p.lora_A["default"].weight,
                                   rtol=1e-3, atol=1e-5)


def test_pissa_bf16_base_reloads_close(tmp_path: Path, tiny_llama: Path) -> None:
    """On a bf16 base the residual is rounded to bf16: the converted adapter on the original base gives the trained
    model up to that rounding."""
    from peft import PeftModel

    tm = _build(tiny_llama, "quantization.bits=16", "quantization.compute_dtype=bf16", "adapter.init=pissa")
    with torch.no_grad():
        for p in tm.module.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
        trained = tm.module(IDS.cuda()).float()
    tm.save(tmp_path / "a")
    base = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.bfloat16).cuda()
    reloaded = PeftModel.from_pretrained(base, tmp_path / "a").eval()
    with torch.no_grad():
        got = reloaded(input_ids=IDS.cuda()).logits.float()
    assert (got - trained).abs().max() < 0.1 * trained.abs().max()
    assert (got.argmax(-1) == trained.argmax(-1)).float().mean() > 0.9


@pytest.mark.parametrize("overrides", [["train.neftune_alpha=5"], ["adapter.init=eva"],
                                       ["adapter.init=eva", "adapter.eva_rho=6", "adapter.rank=2"],
                                       ["adapter.init=loftq"]])
def test_decoder_runs_on_cuda(tmp_path: Path, tiny_llama: Path, overrides: list[str]) -> None:
    from loratune.cli import main

    path = write_run_yaml(tmp_path, tiny_llama, train={"max_steps": 3, "save_every": 0, "deterministic": False})
    assert main(["train", str(path), "model.implementation=loratune", *overrides]) == 0
    assert (tmp_path / "out" / "adapter_model.safetensors").is_file()
