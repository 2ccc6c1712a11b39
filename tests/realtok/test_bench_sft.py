"""benchmarks/bench_sft.py on the CPU: the realistic SFT workload (real Llama-3.1 tokenizer and template, random
one-token words, log-normal lengths) trained for one epoch by `loratune train` padding-free (the default) and
padded, each in its own process, with the numbers the benchmark reports checked against the data."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from transformers import AutoTokenizer

sys.path.insert(0, str(Path(__file__).parents[2] / "benchmarks"))
import bench_sft  # noqa: E402


def test_one_token_words_and_log_normal_lengths(tokenizer_dir) -> None:
    folder = tokenizer_dir("llama3_1")
    words = bench_sft.one_token_words(folder / "tokenizer.json")
    assert len(words) > 5000
    tok = AutoTokenizer.from_pretrained(folder)
    rng = np.random.default_rng(0)
    sample = [words[i] for i in rng.integers(0, len(words), 200)]
    # k words are k tokens, with or without a space before the first
    assert len(tok(" ".join(sample), add_special_tokens=False)["input_ids"]) == 200
    assert len(tok(" " + " ".join(sample), add_special_tokens=False)["input_ids"]) == 200
    convs = bench_sft.conversations(words, 4000, 7, 50, 200, 2000)
    prompts = np.array([len(c["messages"][0]["content"].split()) for c in convs])
    replies = np.array([len(c["messages"][1]["content"].split()) for c in convs])
    assert (prompts + replies).max() <= 2000 and min(prompts.min(), replies.min()) >= 1
    assert 45 <= np.median(prompts) <= 55 and 185 <= np.median(replies) <= 215  # the medians asked for
    assert 300 <= (prompts + replies).mean() <= 380  # about 350 tokens a conversation, as the issue says
    again = bench_sft.conversations(words, 4000, 7, 50, 200, 2000)
    assert again == convs  # seeded


@pytest.mark.slow
def test_default_and_padded_epochs_on_the_cpu(tmp_path: Path, tokenizer_dir) -> None:
    folder = tokenizer_dir("llama3_1")
    out = tmp_path / "out"
    args = bench_sft.parse_args(["--device", "cpu", "--shape", "tiny", "--tokenizer", str(folder), "--n", "32",
                                 "--prompt-median", "12", "--reply-median", "24", "--max-length", "128",
                                 "--paths", "default,padded", "--work-dir", str(tmp_path / "work"),
                                 "--out-dir", str(out)])
    bench_sft.main(args)
    report = json.loads((out / "sft_tiny.json").read_text())
    by = {r["path"]: r for r in report["results"]}
    assert set(by) == {"default", "padded"} and not any("error" in r for r in by.values())
    default, padded = by["default"], by["padded"]
    assert default["implementation"] == padded["implementation"] == "loratune"
    assert (default["batching"], padded["batching"]) == ("padding_free", "padded")
    assert default["tokens_per_batch"] == 128  # batch_size 1 x data.max_length
    assert default["graph_replays"] == padded["graph_replays"] == 0  # no CUDA graphs on the CPU
    # both loops saw every real token of the 32 conversations once (the template's count, no padding)
    expected = report["real_tokens_by_template"]
    assert default["real_tokens"] == padded["real_tokens"] == expected > 32 * 11
    assert default["supervised_tokens"] == padded["supervised_tokens"] < expected
    # effective batch 16 conversations: 2 steps; the same samples per step, token-normalised: the same losses
    assert default["steps"] == padded["steps"] == 2
    assert max(abs(a - b) / b for a, b in zip(default["losses"], padded["losses"])) < 1e-5
    assert all(11 < x < 12.5 for x in default["losses"])  # ~ln(128256) for a random model
    assert default["tokens_per_s"] == pytest.approx(expected / default["seconds"])
    table = (out / "sft_tiny.md").read_text()
    assert "| default |" in table and "| padded |" in table and f"{expected:,}" in table
