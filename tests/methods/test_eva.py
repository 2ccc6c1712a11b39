"""adapter.init eva: LoRA A from the principal directions of each layer's inputs on training data (B zero), the
same directions peft's EVA finds (rho 1, label mask), on both model codes; a run through `loratune train`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from train_helpers import write_run_yaml
from transformers import AutoModelForCausalLM

from loratune.config import load_config
from loratune.data.sample import Sample
from loratune.model.build import build_trainable
from loratune.model import eva as eva_mod
from loratune.model.eva import eva_directions, init_eva
from loratune.model.memory import load_model_config
from loratune.model.resolve import decide


def _samples(n: int = 6, length: int = 24) -> list[Sample]:
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(n):
        ids = torch.randint(3, 400, (length,), generator=g).tolist()
        out.append(Sample(ids, [-100] * 6 + ids[6:]))
    return out


def _abs_cos(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    a = a / a.norm(dim=1, keepdim=True)
    b = b / b.norm(dim=1, keepdim=True)
    return (a * b).sum(1).abs()


def test_directions_are_the_centred_principal_axes() -> None:
    g = torch.Generator().manual_seed(0)
    basis = torch.linalg.qr(torch.randn(16, 16, generator=g))[0]
    x = (torch.randn(500, 16, generator=g) * torch.tensor([10.0, 5.0, 2.5] + [0.1] * 13)) @ basis.T + 3.0  # offset: centring matters
    a = eva_directions(x, 3)
    assert _abs_cos(a, basis.T[:3]).min() > 0.99


def _model(tiny_llama: Path, implementation: str):
    cfg = load_config(None, [f"model.path={tiny_llama}", "adapter.rank=4", "adapter.alpha=8", "adapter.dropout=0",
                             "quantization.bits=32", "adapter.init=eva", f"model.implementation={implementation}"])
    torch.manual_seed(0)
    return build_trainable(cfg, decide(cfg, "cpu", load_model_config(cfg))).module


@pytest.mark.parametrize("implementation", ["loratune", "transformers"])
def test_eva_matches_peft(tiny_llama: Path, implementation: str) -> None:
    from peft import EvaConfig, LoraConfig
    from peft.tuners.lora.eva import get_eva_state_dict

    samples = _samples()
    model = _model(tiny_llama, implementation)
    assert init_eva(model, samples) == 6 * 18
    base = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
    config = LoraConfig(r=4, lora_alpha=8, init_lora_weights="eva",
                        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
                        eva_config=EvaConfig(rho=1.0, tau=0.99, use_label_mask=True))
    batch = {"input_ids": torch.tensor([s.input_ids for s in samples]),
             "labels": torch.tensor([s.labels for s in samples])}
    theirs = get_eva_state_dict(base, [batch], peft_config=config, show_progress_bar=False)
    pairs = {"layers.0.attn.q_proj": "model.layers.0.self_attn.q_proj",
             "layers.1.mlp.down_proj": "model.layers.1.mlp.down_proj",
             "layers.1.mlp.up_proj": "model.layers.1.mlp.up_proj"}
    for ours, hf in pairs.items():
        if implementation == "loratune":
            layer = model.get_submodule(ours)
            a, b = layer.lora_A, layer.lora_B
        else:
            layer = model.get_submodule("base_model.model." + hf)
            a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
        assert not b.any()
        ref = theirs[hf]
        # peft's randomized incremental PCA: the leading directions agree, the later ones less tightly
        cos = _abs_cos(a[:2], ref[:2])
        assert cos.min() > 0.99, (hf, cos)


def test_train_with_eva(tmp_path: Path, tiny_llama: Path) -> None:
    from loratune.cli import main

    path = write_run_yaml(tmp_path, tiny_llama, train={"max_steps": 2, "save_every": 0})
    assert main(["train", str(path), "adapter.init=eva"]) == 0
    assert (tmp_path / "out" / "adapter_model.safetensors").is_file()
    saved = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert saved["rank_pattern"]  # adapter.eva_rho 2 (the default) redistributed the ranks


@pytest.mark.parametrize("implementation", ["loratune", "transformers"])
def test_eva_rho_run_resumes_exactly(tmp_path: Path, tiny_llama: Path, implementation: str) -> None:
    from train_helpers import adapter_bytes, config

    from loratune.train.checkpoint import checkpoint_name
    from loratune.train.run import train

    path = write_run_yaml(tmp_path, tiny_llama)
    common = ("adapter.init=eva", "adapter.eva_rho=2", f"model.implementation={implementation}")
    first = train(config(path, *common, "output.dir=" + str(tmp_path / "a")))
    ckpt = tmp_path / "a" / "checkpoints" / checkpoint_name(6)
    assert json.loads((ckpt / "adapter_config.json").read_text())["rank_pattern"]
    result = train(config(path, *common, f"train.resume={ckpt}", "output.dir=" + str(tmp_path / "b")))
    assert result.steps == 8 and adapter_bytes(tmp_path / "b") == adapter_bytes(first.out_dir)


def test_explained_variance_ratios_are_the_squared_singular_values_shares() -> None:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(200, 3, generator=g) * torch.tensor([3.0, 2.0, 1.0]) + 5.0
    ratios = eva_mod.explained_variance_ratios(x)
    xc = x - x.mean(0)
    eig = torch.linalg.eigvalsh(xc.T @ xc).flip(0)  # the covariance's eigenvalues, largest first
    assert torch.allclose(ratios, eig / eig.sum(), atol=1e-5)
    assert abs(float(ratios.sum()) - 1.0) < 1e-5


def test_rank_distribution_by_hand() -> None:
    ratios = {"a": torch.tensor([0.50, 0.30, 0.10, 0.05]),
              "b": torch.tensor([0.40, 0.35, 0.20, 0.04]),
              "c": torch.tensor([0.45, 0.02, 0.01, 0.01])}
    ranks = {"a": 2, "b": 2, "c": 2}
    # rho 2: each offers its first 4 ratios; the 6 largest of all: a.50 c.45 b.40 b.35 a.30 b.20
    assert eva_mod.eva_rank_distribution(ratios, ranks, 2.0) == {"a": 2, "b": 3, "c": 1}
    # rho 1.5: each offers 3; the 6 largest: a.50 c.45 b.40 b.35 a.30 b.20 (the same ones)
    assert eva_mod.eva_rank_distribution(ratios, ranks, 1.5) == {"a": 2, "b": 3, "c": 1}
    # rho 1: each offers r = 2, all taken: the ranks stay
    assert eva_mod.eva_rank_distribution(ratios, ranks, 1.0) == ranks
    skewed = {"a": torch.tensor([0.9, 0.05, 0.03, 0.02]), "b": torch.tensor([0.5, 0.3, 0.1, 0.1]),
              "c": torch.tensor([0.01, 0.01, 0.01, 0.01])}
    out = eva_mod.eva_rank_distribution(skewed, ranks, 2.0)
    assert out == {"a": 2, "b": 4, "c": 0}  # a.9 b.5 b.3 b.1 b.1 a.05; c gets nothing
    assert sum(out.values()) == sum(ranks.values())  # the budget holds
    with pytest.raises(ValueError, match="rho"):
        eva_mod.eva_rank_distribution(ratios, ranks, 0.5)


@pytest.mark.parametrize("rank, rho", [(4, 2.0), (2, 6.0)])
@pytest.mark.parametrize("implementation", ["loratune", "transformers"])
def test_eva_rho_redistributes_ranks_and_saves_a_rank_pattern(tmp_path: Path, tiny_llama: Path, implementation: str,
                                                              rank: int, rho: float) -> None:
    from peft import EvaConfig, LoraConfig, PeftModel
    from peft.tuners.lora.eva import get_eva_state_dict

    samples = _samples()
    cfg = load_config(None, [f"model.path={tiny_llama}", f"adapter.rank={rank}", "adapter.alpha=8",
                             "adapter.dropout=0", "quantization.bits=32", "adapter.init=eva",
                             f"model.implementation={implementation}"])
    torch.manual_seed(0)
    trained = build_trainable(cfg, decide(cfg, "cpu", load_model_config(cfg)))
    model = trained.module
    init_eva(model, samples, rho=rho)
    base = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    config = LoraConfig(r=rank, lora_alpha=8, init_lora_weights="eva", target_modules=targets,
                        eva_config=EvaConfig(rho=rho, tau=0.99, use_label_mask=True))
    batch = {"input_ids": torch.tensor([s.input_ids for s in samples]),
             "labels": torch.tensor([s.labels for s in samples])}
    theirs = {n: int(t.shape[0]) for n, t in
              get_eva_state_dict(base, [batch], peft_config=config, show_progress_bar=False).items()}
    if implementation == "loratune":
        ours = {model.hf_name(n): m.rank for n, m in model.adapted_layers().items()}
    else:
        ours = {n.removeprefix("base_model.model."): int(m.lora_A["default"].weight.shape[0])
                for n, m in model.named_modules() if hasattr(m, "lora_A") and "default" in m.lora_A}
    ours.update({n: 0 for n in theirs if n not in ours})  # rank 0: no adapter left on the layer
    assert sum(ours.values()) == rank * len(theirs)  # the rank budget holds
    assert len(set(ours.values())) > 1  # the ranks were redistributed
    assert max(ours.values()) <= round(rank * rho)
    assert (0 in ours.values()) == (rho == 6.0)  # rho 6: some layers lose their adapter (out of target_modules)
    assert ours == theirs, (ours, theirs)
    # B is zero: the model is unchanged; give B values so the reload test compares something
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    trained.save(tmp_path / "adapter")
    saved = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert {k.removeprefix("base_model.model."): v for k, v in saved["rank_pattern"].items()} == \
        {n: r for n, r in ours.items() if r not in (0, saved["r"])}
    ids = torch.tensor([samples[0].input_ids])
    with torch.no_grad():
        model.eval()
        if implementation == "loratune":
            from loratune.decoder import Boundaries

            want = model(ids[0], Boundaries.from_lengths([ids.shape[1]]))
        else:
            want = model(input_ids=ids).logits[0]
        peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32),
                                               str(tmp_path / "adapter")).eval()
        got = peft_model(input_ids=ids).logits[0]
    assert torch.allclose(got, want, atol=1e-5), (got - want).abs().max()
    # and loratune's decoder reads the same file (per-layer ranks, layers without an adapter) to the same logits
    from loratune.decoder import Boundaries, load_adapter

    dec_cfg = load_config(None, [f"model.path={tiny_llama}", "quantization.bits=32", "model.implementation=loratune"])
    decoder = build_trainable(dec_cfg, decide(dec_cfg, "cpu", load_model_config(dec_cfg))).module
    load_adapter(decoder, tmp_path / "adapter")
    assert {decoder.hf_name(n): m.rank for n, m in decoder.adapted_layers().items()} == \
        {n: r for n, r in ours.items() if r}
    with torch.no_grad():
        theirs_dec = decoder.eval()(ids[0], Boundaries.from_lengths([ids.shape[1]]))
    assert torch.allclose(theirs_dec, got, atol=1e-5), (theirs_dec - got).abs().max()
