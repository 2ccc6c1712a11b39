"""benchmarks/bench_eval.py runs on the CPU with the tiny shape (the smoke test of the GPU benchmark): every path
scores every question, and loratune's paths agree with lm-evaluation-harness on the same loaded model."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

pytest.importorskip("lm_eval")
sys.path.insert(0, str(Path(__file__).parents[2] / "benchmarks"))

import bench_eval  # noqa: E402


@pytest.mark.slow
def test_bench_eval_smoke_on_cpu(tmp_path: Path) -> None:
    report = bench_eval.main(["--shape", "tiny", "--device", "cpu", "--questions", "10", "--subjects", "2",
                              "--shots", "2", "--batch-size", "4", "--lm-eval-batch-size", "4",
                              "--paths", "loratune,loratune-hf,lm_eval", "--work-dir", str(tmp_path / "work"),
                              "--out-dir", str(tmp_path / "out")])
    saved = json.loads((tmp_path / "out" / "bench_eval_tiny.json").read_text())
    assert saved["results"].keys() == report["results"].keys() == {"loratune", "loratune-hf", "lm_eval"}
    r = saved["results"]
    assert r["loratune"]["network"] == "Decoder" and r["loratune-hf"]["network"] == "LlamaForCausalLM"
    for path in ("loratune", "loratune-hf"):
        assert r[path]["questions"] == r["lm_eval"]["questions"] == 10
        assert r[path]["vs_lm_eval"]["max_abs_diff"] < 1e-4  # fp32 compute on the CPU: the same numbers
        assert r[path]["vs_lm_eval"]["same_prediction"] == 1.0
        assert r[path]["accuracy"] == r["lm_eval"]["accuracy"]
        assert r[path]["speedup_vs_lm_eval"] > 0
    table = (tmp_path / "out" / "table_eval_tiny.md").read_text()
    assert "| loratune (Decoder) |" in table and "| lm_eval |" in table
