"""Which models load together: adapters on one base share it, with that base served beside them."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from loratune.eval.config import EvalModelConfig
from loratune.eval.models import fingerprint, load, plan, selected

sys.path.insert(0, str(Path(__file__).parent.parent / "infer"))
from run_folder import make_adapter_dir  # noqa: E402


@pytest.fixture(scope="module")
def runs(tiny_models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("eval-runs")
    return {"a": make_adapter_dir(tiny_models["llama"], root / "a", seed=1),
            "b": make_adapter_dir(tiny_models["llama"], root / "b", seed=2),
            "q": make_adapter_dir(tiny_models["qwen2"], root / "q", seed=3, family="qwen2")}


def _names(groups) -> list[list[str]]:
    return [[s.spec.name for s in g] for g in groups]


def test_grouping(tiny_models: dict[str, Path], runs: dict[str, Path]) -> None:
    llama = str(tiny_models["llama"])
    specs = [EvalModelConfig(name="ta", path=str(runs["a"])), EvalModelConfig(name="base", path=llama),
             EvalModelConfig(name="tq", path=str(runs["q"])), EvalModelConfig(name="tb", path=str(runs["b"])),
             EvalModelConfig(name="base8", path=llama, bits=8)]
    groups = plan(specs)
    assert _names(groups) == [["base", "ta", "tb"], ["tq"], ["base8"]]  # the base first in its group
    assert {s.spec.name: s.bits for g in groups for s in g} == {"base": 16, "ta": 16, "tb": 16, "tq": 16, "base8": 8}
    # an adapter reloaded in 4-bit is another group, and so is its base in 4-bit
    specs4 = [EvalModelConfig(name="base", path=llama), EvalModelConfig(name="ta4", path=str(runs["a"]), bits=4),
              EvalModelConfig(name="base4", path=llama, bits=4)]
    assert _names(plan(specs4)) == [["base"], ["base4", "ta4"]]


def test_a_group_serves_its_base_and_adapters(tiny_models: dict[str, Path], runs: dict[str, Path]) -> None:
    import torch

    specs = [EvalModelConfig(name="base", path=str(tiny_models["llama"])), EvalModelConfig(name="ta", path=str(runs["a"]))]
    (group,) = plan(specs)
    loaded = load(group, "transformers")  # (the transformers model: called as transformers models are)
    assert loaded.names == {"base": "base", "ta": "ta"}
    ids = torch.tensor([[1, 2, 3, 4]])
    with selected(loaded.engine, "base") as net, torch.no_grad():
        base = net(input_ids=ids).logits
    with selected(loaded.engine, "ta") as net, torch.no_grad():
        tuned = net(input_ids=ids).logits
    plain = __import__("transformers").AutoModelForCausalLM.from_pretrained(tiny_models["llama"], dtype=torch.float32)
    with torch.no_grad():
        assert torch.allclose(base, plain(input_ids=ids).logits, atol=1e-5)  # the base is the base
    assert not torch.allclose(base, tuned, atol=1e-3)


def test_fingerprints_follow_the_files(tiny_models: dict[str, Path], runs: dict[str, Path], tmp_path: Path) -> None:
    import shutil

    copy = tmp_path / "a-copy"
    shutil.copytree(runs["a"], copy)
    fp = lambda path: fingerprint(plan([EvalModelConfig(name="m", path=str(path))])[0][0])  # noqa: E731
    assert fp(runs["a"]) != fp(runs["b"])  # other adapter weights
    assert fp(copy) != fp(runs["a"])  # the spec's path is part of it
    before = fp(copy)
    assert fp(copy) == before
    (copy / "adapter_model.safetensors").write_bytes((copy / "adapter_model.safetensors").read_bytes()[:-1] + b"\0")
    assert fp(copy) != before
