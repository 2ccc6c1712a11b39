"""NEFTune: the noise's statistics (uniform, bound alpha/sqrt(L d) per sample), per-segment lengths of a stream,
on in training and off in eval on both model codes, and a run through `loratune train`."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from train_helpers import write_run_yaml

from loratune.config import load_config
from loratune.model.neftune import NEFTuneHooks, add_noise, magnitude, token_lengths


def test_token_lengths_of_a_stream() -> None:
    positions = torch.tensor([0, 1, 2, 0, 1, 0, 1, 2, 3, 4])
    assert token_lengths(positions).tolist() == [3.0] * 3 + [2.0] * 2 + [5.0] * 5


def test_noise_is_uniform_with_the_papers_bound() -> None:
    torch.manual_seed(0)
    alpha, length, d = 5.0, 50, 64
    x = torch.zeros(length, d)
    noise = add_noise(x, torch.full((length,), float(length)), alpha)
    bound = magnitude(alpha, length, d)
    assert bound == pytest.approx(alpha / math.sqrt(length * d))
    assert noise.abs().max() <= bound
    assert noise.abs().max() > 0.99 * bound  # the whole interval is used
    assert noise.mean().abs() < 0.05 * bound
    assert noise.var().item() == pytest.approx(bound ** 2 / 3, rel=0.05)  # variance of U(-b, b)


def test_each_segment_gets_its_own_magnitude() -> None:
    torch.manual_seed(0)
    positions = torch.cat([torch.arange(10), torch.arange(1000)])
    noise = add_noise(torch.zeros(1010, 32), token_lengths(positions), 5.0)
    assert noise[:10].abs().max() > magnitude(5.0, 1000, 32) * 2  # the short sample is not damped by the long one
    assert noise[:10].abs().max() <= magnitude(5.0, 10, 32)
    assert noise[10:].abs().max() <= magnitude(5.0, 1000, 32)


def _decoder(tiny_llama: Path):
    from loratune.decoder.load import build_decoder

    cfg = load_config(None, [f"model.path={tiny_llama}", "quantization.bits=32", "adapter.dropout=0"])
    return build_decoder(cfg, seed=0)


def test_decoder_noise_in_training_only(tiny_llama: Path) -> None:
    decoder = _decoder(tiny_llama)
    ids = torch.tensor([[5, 9, 14, 3, 7, 11]])
    decoder.eval()
    clean = decoder(ids)
    decoder.neftune_alpha = 5.0
    assert torch.equal(decoder(ids), clean)  # eval: off
    decoder.train()
    noisy = decoder(ids)
    assert not torch.allclose(noisy, clean, atol=1e-4)
    decoder.eval()
    assert torch.equal(decoder(ids), clean)


def test_hf_hooks_noise_in_training_only_per_segment(tiny_llama: Path) -> None:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
    emb = model.get_input_embeddings()
    seen: list[torch.Tensor] = []
    probe = emb.register_forward_hook(lambda m, a, out: seen.append(out.detach().clone()))  # before NEFTune's
    hooks = NEFTuneHooks(model, alpha=5.0)
    captured: list[torch.Tensor] = []
    after = model.model.layers[0].register_forward_pre_hook(lambda m, a: captured.append(a[0].detach().clone()))
    ids = torch.tensor([[5, 9, 14, 3, 7, 11, 4, 8]])
    pos = torch.tensor([[0, 1, 0, 1, 2, 3, 4, 5]])
    model.train()
    model.model(input_ids=ids, position_ids=pos)
    noise = captured[-1] - seen[-1]
    d = noise.shape[-1]
    assert noise[0, :2].abs().max() <= magnitude(5.0, 2, d)
    assert noise[0, :2].abs().max() > magnitude(5.0, 6, d)  # the 2-token sample's own, larger bound
    assert noise[0, 2:].abs().max() <= magnitude(5.0, 6, d)
    model.eval()
    model.model(input_ids=ids, position_ids=pos)
    assert torch.equal(captured[-1], seen[-1])
    hooks.remove()
    model.train()
    model.model(input_ids=ids, position_ids=pos)
    assert torch.equal(captured[-1], seen[-1])
    probe.remove()
    after.remove()


@pytest.mark.parametrize("implementation", ["loratune", "transformers"])
def test_train_with_neftune(tmp_path: Path, tiny_llama: Path, implementation: str) -> None:
    from loratune.train.run import train

    path = write_run_yaml(tmp_path, tiny_llama, model={"path": str(tiny_llama), "implementation": implementation},
                          train={"max_steps": 2, "neftune_alpha": 5.0, "save_every": 0, "deterministic": False})
    (tmp_path / "plain").mkdir()
    plain = write_run_yaml(tmp_path / "plain", tiny_llama,
                           model={"path": str(tiny_llama), "implementation": implementation},
                           train={"max_steps": 2, "save_every": 0, "deterministic": False})
    noisy_result = train(load_config(path))
    plain_result = train(load_config(plain))
    assert (tmp_path / "out" / "adapter_model.safetensors").is_file()
    assert noisy_result.steps == plain_result.steps == 2
    # the same data and seed: the first step's loss differs only by the noise
    assert noisy_result.first_loss != plain_result.first_loss
