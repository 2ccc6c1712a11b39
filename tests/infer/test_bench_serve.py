"""benchmarks/bench_serve.py runs on the CPU with the tiny shape (the smoke test of the GPU benchmark): a real
`loratune serve` subprocess under the OpenAI client with one and with four adapters, and transformers `generate`
beside it; every request gets exactly the tokens it asked for, and the JSON holds every field the table needs."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parents[2] / "benchmarks"))

import bench_serve  # noqa: E402


@pytest.mark.slow
def test_bench_serve_smoke_on_cpu(tmp_path: Path) -> None:
    gen, prompt, per_client = 5, 12, 2
    report = bench_serve.main(["--shape", "tiny", "--device", "cpu", "--concurrency", "1,3", "--gen-tokens", str(gen),
                               "--prompt-tokens", str(prompt), "--requests-per-client", str(per_client),
                               "--work-dir", str(tmp_path / "work"), "--out-dir", str(tmp_path / "out")])
    saved = json.loads((tmp_path / "out" / "bench_serve_tiny.json").read_text())
    assert saved == json.loads(json.dumps(report))
    assert saved["bits"] == 32 and saved["rank"] == 16 and saved["gen_tokens"] == gen
    got = {(c["path"], c["adapters"], c["concurrency"]) for c in saved["cases"]}
    assert got == {("loratune serve", a, c) for a in (1, 4) for c in (1, 3)} | {("transformers generate", 1, c)
                                                                                for c in (1, 3)}
    for case in saved["cases"]:
        serve = case["path"] == "loratune serve"
        requests = case["concurrency"] * (per_client if serve else 1)
        assert case["requests"] == requests == len(case["tokens_per_request"])
        assert case["tokens_per_request"] == [gen] * requests  # ignore_eos: exactly the tokens asked for
        assert case["completion_tokens"] == gen * requests
        assert case["tokens_per_s"] == pytest.approx(case["completion_tokens"] / case["seconds"])
        for key in ("ttft_ms", "itl_ms", "tpot_ms"):
            p = case[key]
            assert 0 < p["p50"] <= p["p90"] <= p["p99"], (key, case)
        assert case["ttft_ms"]["n"] == requests
        if serve:  # text tokens only (the benchmark's model): one piece per token, gen - 1 gaps per request
            assert case["itl_ms"]["n"] == requests * (gen - 1)
        assert case["tpot_ms"]["n"] == requests and case["tpot_ms"]["p50"] > 0
    table = (tmp_path / "out" / "table_serve_tiny.md").read_text()
    assert table.count("| loratune serve |") == 4 and table.count("| transformers generate |") == 2
    assert (tmp_path / "work" / "serve-4.log").is_file()
