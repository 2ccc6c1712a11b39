"""benchmarks/bench_decode.py as a whole on the CPU (tiny shape, fp32): it runs, measures every path it can
here (no CUDA graphs on a CPU), and loratune's greedy tokens equal transformers' on the same NF4 + LoRA model."""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))

from bench_decode import main  # noqa: E402


def test_bench_decode_smoke(tmp_path: Path, capsys) -> None:
    r = main(["--shape", "tiny", "--device", "cpu", "--dtype", "fp32", "--rows", "2", "--prompt", "5", "--new", "4",
              "--hf-new", "4", "--ttft-prompt", "12", "--out-dir", str(tmp_path)])
    entry = r["rows"][2]
    assert "graphed" not in entry and entry["eager"]["tokens_per_s"] > 0 and entry["transformers"]["tokens_per_s"] > 0
    assert len(entry["eager_tokens"]) == 4
    assert entry["agree_ours_transformers"] == 4  # fp32: token for token
    assert r["ttft_ms"]["loratune"] > 0 and r["ttft_ms"]["transformers"] > 0
    saved = json.loads((tmp_path / "bench_decode_tiny.json").read_text())
    assert saved["rows"]["2"]["eager_tokens"] == entry["eager_tokens"]
    assert "| 2 | n/a |" in capsys.readouterr().out
