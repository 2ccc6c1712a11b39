"""Data parallel on CPU over gloo: two ranks train what one process trains with the same global batch.

The reference is one process with grad_accum x 2 (the same samples in the same order each step, normalised by
the same supervised-token count); the two-rank run has grad_accum, each rank taking every other index list.
Only the order of float additions differs (each rank sums its own micro-batches, then the ranks' sums are
added; padding-free batching also lays each rank's share in streams of its own), so the adapters agree to
rounding: within 1e-6 after 4 AdamW steps at lr 1e-3. (AdamW turns rounding in gradient entries near zero
into steps of up to lr: at the training tests' lr 3e-3 a re-layout within ONE process already moves the
adapter by ~8e-7, so the comparison uses lr 1e-3.)
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from ddp_helpers import launch, max_adapter_diff, train_rows
from train_helpers import config, write_run_yaml

from loratune.errors import ConfigError
from loratune.train.distributed import World, check_world
from loratune.train.metrics import read_rows
from loratune.train.run import train

STEPS = 4


def _sections(accum: int, batching: str, implementation: str = "auto", **train_extra: object) -> dict:
    return {"model": {"implementation": implementation},
            "adapter": {"dropout": 0.0},  # dropout draws differ between layouts: off for the comparison
            "train": {"grad_accum": accum, "max_steps": STEPS, "save_every": 0, "lr": 1e-3, "batching": batching,
                      **train_extra}}


def _one_process(tmp_path: Path, model: Path, batching: str, implementation: str = "auto") -> Path:
    folder = tmp_path / "one"
    folder.mkdir()
    result = train(config(write_run_yaml(folder, model, **_sections(4, batching, implementation))))
    assert result.steps == STEPS
    return result.out_dir


def _two_ranks(tmp_path: Path, model: Path, batching: str, faults: dict[int, str] | None = None,
               implementation: str = "auto") -> Path:
    folder = tmp_path / "two"
    folder.mkdir()
    ranks = launch(write_run_yaml(folder, model, **_sections(2, batching, implementation)), 2, faults=faults)
    assert ranks.codes == [0, 0], ranks.tail()
    return folder / "out"


@pytest.mark.parametrize("batching, implementation", [("padded", "auto"), ("padding_free", "auto"),
                                                      ("padded", "transformers")])
def test_two_ranks_train_what_one_process_trains(tmp_path: Path, tiny_llama: Path, batching: str,
                                                 implementation: str) -> None:
    """On loratune's decoder (auto) and on transformers + peft (not wrapped in DDP: the loop sums gradients)."""
    one = _one_process(tmp_path, tiny_llama, batching, implementation)
    two = _two_ranks(tmp_path, tiny_llama, batching, implementation=implementation)
    assert max_adapter_diff(one, two) < 1e-6
    rows1, rows2 = train_rows(one), train_rows(two)  # one metrics file, written by rank 0 alone
    assert [r["step"] for r in rows2] == list(range(1, STEPS + 1))
    for a, b in zip(rows1, rows2):
        assert a["tokens"] == b["tokens"]  # the same supervised tokens: the global normaliser
        assert a["step_input_tokens"] == b["step_input_tokens"]
        assert math.isclose(a["loss"], b["loss"], rel_tol=1e-6)
    evals = [[r["eval_loss"] for r in read_rows(out / "metrics.jsonl") if "eval_loss" in r] for out in (one, two)]
    assert len(evals[1]) >= 1 and len(evals[0]) == len(evals[1])  # each rank evaluated half the eval batches
    assert all(math.isclose(a, b, rel_tol=1e-6) for a, b in zip(*evals))
    ckpt = two / "checkpoints" / f"step-{STEPS:08d}"
    assert (ckpt / "rng_rank1.safetensors").is_file()  # the other rank's RNG, for exact resume
    run = json.loads((two / "loratune_run.json").read_text())
    assert run["processes"] == 2 and run["strategy"] == "ddp"  # auto: the tiny model fits one process's memory


def test_dpo_on_two_ranks_equals_one_process(tmp_path: Path, tiny_llama: Path) -> None:
    """Preference training: the loss normalised by the window's pairs over both ranks, the reported rewards,
    margins and accuracy averaged over every rank's pairs."""
    data = str(Path(__file__).parents[2] / "examples" / "data" / "preference.jsonl")
    pairs = {"data": {"datasets": [{"path": data, "max_samples": 24}], "max_length": 128, "eval_split": 4},
             "train": {"method": "dpo", "max_steps": STEPS}}
    outs = []
    for name, accum, world in (("one", 4, 1), ("two", 2, 2)):
        folder = tmp_path / name
        folder.mkdir()
        sections = _sections(accum, "padded")
        path = write_run_yaml(folder, tiny_llama, **{**sections, "data": pairs["data"],
                                                     "train": {**sections["train"], **pairs["train"]}})
        if world == 1:
            train(config(path))
        else:
            ranks = launch(path, 2)
            assert ranks.codes == [0, 0], ranks.tail()
        outs.append(folder / "out")
    assert max_adapter_diff(*outs) < 1e-6
    rows1, rows2 = train_rows(outs[0]), train_rows(outs[1])
    assert len(rows1) == len(rows2) == STEPS
    for a, b in zip(rows1, rows2):
        assert a["tokens"] == b["tokens"]  # pairs
        assert a["accuracy"] == b["accuracy"]
        # rewards are beta x differences of summed log-probabilities (~ -100 in fp32): rounding of ~1e-7
        for key in ("loss", "margin", "rewards_chosen", "rewards_rejected"):
            assert math.isclose(a[key], b[key], rel_tol=1e-5, abs_tol=1e-6), (key, a[key], b[key])


def test_nonfinite_on_one_rank_skips_the_step_on_all(tmp_path: Path, tiny_llama: Path) -> None:
    """A NaN loss in rank 1's 2nd micro-batch (step 1) skips step 1 everywhere, as one process skips it when its
    window's 2nd micro-batch is NaN; the runs then agree as without the fault."""
    (tmp_path / "one").mkdir()
    import os

    os.environ["LORATUNE_FAULT"] = "nan@loss#2"
    try:
        result = train(config(write_run_yaml(tmp_path / "one", tiny_llama, **_sections(4, "padded"))))
    finally:
        del os.environ["LORATUNE_FAULT"]
    two = _two_ranks(tmp_path, tiny_llama, "padded", faults={1: "nan@loss#2"})
    assert max_adapter_diff(result.out_dir, two) < 1e-6
    rows = train_rows(two)
    assert rows[0]["skipped"] == 1 and rows[-1]["skipped"] == 1
    assert rows[0]["loss"] is None or not math.isfinite(rows[0]["loss"])


def test_a_launch_must_match_train_devices() -> None:
    with pytest.raises(ConfigError, match="train.devices is 2 but 1 process"):
        check_world(2, "auto", World(0, 1))
    assert check_world("auto", "fsdp", World(0, 2)) == "fsdp"
    assert check_world("auto", "ddp", World(1, 2)) == "ddp"
    assert check_world("auto", "auto", World(1, 2)) == "auto"  # decided from the memory plan (test_plan.py)
    assert check_world("auto", "fsdp", World(0, 1)) == "single"  # one process, no process group: nothing to shard


def test_shares_cover_the_window_in_order() -> None:
    window = [[0, 1], [2, 3], [4, 5], [6, 7], [8, 9]]  # a short last window of an epoch: 5 lists on 2 ranks
    shares = [World(r, 2).share(window) for r in range(2)]
    assert shares == [[[0, 1], [4, 5], [8, 9]], [[2, 3], [6, 7]]]
    assert World(2, 8).share(window[:2]) == []  # a rank with nothing still joins the collectives
    assert torch.equal(torch.tensor(sorted(sum(shares, []))), torch.tensor(window))
