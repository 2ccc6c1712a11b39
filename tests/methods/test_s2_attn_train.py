"""`loratune train` with train.s2_attn (S²-Attn, loratune.decoder.s2_attn) on the tiny Llama, on CPU."""

from __future__ import annotations

from pathlib import Path

import pytest
from train_helpers import write_run_yaml

from loratune.config import load_config


@pytest.mark.slow
def test_loratune_train_with_s2_attn(tmp_path: Path, tiny_llama: Path) -> None:
    from loratune.train.run import train

    results = {}
    for name, extra in (("plain", {}), ("s2", {"s2_attn": True, "s2_attn_group": 4}),
                        ("covering", {"s2_attn": True, "s2_attn_group": 100000})):
        (tmp_path / name).mkdir()
        path = write_run_yaml(tmp_path / name, tiny_llama, model={"path": str(tiny_llama), "implementation": "loratune"},
                              train={"max_steps": 2, "save_every": 0, "deterministic": False, **extra})
        results[name] = train(load_config(path))
        assert (tmp_path / name / "out" / "adapter_model.safetensors").is_file()
    assert results["s2"].steps == results["plain"].steps == 2
    # same data and seed: groups of 4 tokens change the first loss, a group covering every sample does not
    assert abs(results["s2"].first_loss - results["plain"].first_loss) > 1e-4
    assert results["covering"].first_loss == pytest.approx(results["plain"].first_loss, abs=1e-5)
