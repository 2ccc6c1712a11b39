"""Preference methods through `loratune train`, on the loop SFT trusts: each method trains and records its metrics,
a step's gradient does not depend on how its pairs are split into micro-batches, a DPO run killed with SIGKILL
(mid-step and mid-save) resumes to the bit-identical adapter on CPU, and DPO moves held-out preferences."""

from __future__ import annotations

import json
import math
import signal
from pathlib import Path

import pytest
import torch
from train_helpers import adapter_bytes, build_loop, config, run_cli, write_run_yaml

from loratune.config import PreferenceConfig, load_config
from loratune.data.preference import prepare_preference_data
from loratune.model.load import load_tokenizer
from loratune.pref.batching import PreferenceBatching
from loratune.pref.objective import Preference
from loratune.train.metrics import read_rows
from loratune.train.run import train

ROOT = Path(__file__).parents[2]
PAIRS = ROOT / "examples" / "data" / "preference.jsonl"
KTO = ROOT / "examples" / "data" / "kto.jsonl"
KILLED = -signal.SIGKILL


def _sections(method: str, **train: object) -> dict:
    data = KTO if method == "kto" else PAIRS
    return {"data": {"datasets": [{"path": str(data), "max_samples": 24}], "eval_split": 4},
            "train": {"method": method, "optimizer": "adamw", **train}}


@pytest.mark.parametrize(("method", "options"), [("dpo", {}), ("dpo", {"loss": "ipo"}), ("orpo", {}),
                                                 ("simpo", {}), ("kto", {})])
def test_each_method_trains_and_records_its_metrics(tmp_path: Path, tiny_llama: Path, method: str,
                                                    options: dict) -> None:
    sections = _sections(method, max_steps=2, save_every=0, eval_every=2)
    path = write_run_yaml(tmp_path, tiny_llama, preference=options, **sections)
    result = train(config(path))
    assert result.steps == 2 and math.isfinite(result.last_loss)
    rows = read_rows(result.out_dir / "metrics.jsonl")
    step = [r for r in rows if "loss" in r][-1]
    for key in ("rewards_chosen", "rewards_rejected", "logps_chosen", "logps_rejected"):
        assert math.isfinite(step[key]), key
    evals = [r for r in rows if "eval_loss" in r]
    assert evals and any(k.startswith("eval_rewards_") for k in evals[-1])
    if method != "kto":
        assert 0.0 <= step["accuracy"] <= 1.0 and step["margin"] == pytest.approx(
            step["rewards_chosen"] - step["rewards_rejected"], abs=1e-5)
    assert result.tokens == 2 * 4  # units: 4 pairs (completions) a step
    assert (result.out_dir / "adapter_model.safetensors").is_file()


def test_the_gradient_does_not_depend_on_the_split(tmp_path: Path, tiny_llama: Path) -> None:
    """4 pairs as 1 x 4, 4 x 1 padded micro-batches, or padding-free streams: the same normalised gradient."""
    cfg = load_config(None, [f"model.path={tiny_llama}", f"data.datasets=[{{path: {PAIRS}, max_samples: 4}}]",
                             "train.method=dpo"])
    samples = prepare_preference_data(cfg.data, *load_tokenizer(cfg.model), 0, "dpo", log_stats=False).train
    grads = {}
    for name, (batching, size, accum) in {"padded 4x1": ("padded", 4, 1), "padded 1x4": ("padded", 1, 4),
                                          "padding-free": ("padding_free", 2, 2)}.items():
        loop = build_loop(tiny_llama, samples, "adapter.rank=4", "adapter.dropout=0", "quantization.bits=32",
                          f"train.batching={batching}", f"train.batch_size={size}", f"train.grad_accum={accum}",
                          "train.method=dpo")
        b = loop.batching
        loop.batching = PreferenceBatching(b.padding_free, b.batch_size, 2 * b.tokens, b.pad_id)
        loop.objective = Preference("dpo", PreferenceConfig())
        window = [list(range(i, i + size)) for i in range(0, 4, size)]
        loss, n = loop.forward_backward(loop.batches(window))
        assert n == 4 and math.isfinite(loss)
        grads[name] = torch.cat([p.grad.flatten() for p in loop.params])
        assert set(loop.stats) >= {"accuracy", "margin"}
    ref = grads["padded 4x1"]
    for name, g in grads.items():
        assert float((g - ref).abs().max()) < 1e-6 * max(1.0, float(ref.abs().max())), name


# padding-free, 4 pairs a step in one micro-batch: backward #k is in step k; saves at 3, 6 and 8 (final)
CHAIN = ["kill@step.backward#3", "kill@save.renamed#1", "term@step.end#2", "kill@save.files#1"]


@pytest.mark.slow
@pytest.mark.parametrize("implementation", ["auto", "transformers"])
def test_killed_dpo_run_resumes_to_the_same_adapter(tmp_path: Path, tiny_llama: Path, implementation: str) -> None:
    sections = _sections("dpo", max_steps=8, save_every=3, eval_every=4)
    sections["model"] = {"implementation": implementation}
    ref = tmp_path / "ref"
    ref.mkdir()
    want = train(config(write_run_yaml(ref, tiny_llama, **sections)))
    assert want.steps == 8
    path = write_run_yaml(tmp_path, tiny_llama, **sections)
    for fault in CHAIN:
        p = run_cli(path, fault=fault)
        assert p.returncode == (143 if fault.startswith("term") else KILLED), (fault, p.stderr[-3000:])
    p = run_cli(path)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "resuming from" in p.stderr and "training done: 8 steps" in p.stdout
    out = tmp_path / "out"
    assert adapter_bytes(out) == adapter_bytes(want.out_dir)
    rows = [r for r in read_rows(out / "metrics.jsonl") if "loss" in r]
    assert [r["step"] for r in rows] == list(range(1, 9))
    want_rows = [r for r in read_rows(want.out_dir / "metrics.jsonl") if "loss" in r]
    assert [r["margin"] for r in rows] == [r["margin"] for r in want_rows]


def test_dpo_moves_held_out_preferences(tmp_path: Path, tiny_llama: Path) -> None:
    """Synthetic pairs (chosen: the answer; rejected: a refusal): on held-out pairs, the chosen margin and the
    pairwise accuracy rise from the untrained adapter's (0: policy = reference) as training goes on."""
    sections = _sections("dpo", max_steps=12, save_every=0, eval_every=4, lr=5e-3)
    sections["data"] = {"datasets": [{"path": str(PAIRS)}], "eval_split": 8}
    result = train(config(write_run_yaml(tmp_path, tiny_llama, **sections)))
    evals = [r for r in read_rows(result.out_dir / "metrics.jsonl") if "eval_loss" in r]
    assert [r["step"] for r in evals] == [4, 8, 12]
    margins = [r["eval_margin"] for r in evals]
    accuracy = [r["eval_accuracy"] for r in evals]
    losses = [r["eval_loss"] for r in evals]
    assert margins[0] > 0 and margins == sorted(margins) and margins[-1] > margins[0] + 0.1, margins
    assert accuracy[-1] >= 0.875 and accuracy[-1] >= accuracy[0], accuracy
    assert losses[-1] < losses[0] < math.log(2), losses  # log 2: the loss of the untrained adapter
    json.dumps(evals)


def test_the_plot_has_a_preference_panel(tmp_path: Path) -> None:
    from loratune.train.metrics import _preference_series, plot_losses

    rows = [{"step": s, "loss": 0.7 - 0.1 * s, "rewards_chosen": 0.1 * s, "rewards_rejected": -0.2 * s,
             "margin": 0.3 * s, "accuracy": min(1.0, 0.25 * s)} for s in range(1, 5)]
    rows.append({"step": 4, "eval_loss": 0.5, "eval_margin": 1.0, "eval_accuracy": 0.75})
    series = _preference_series(rows)
    assert series["margin"] == [(s, pytest.approx(0.3 * s)) for s in range(1, 5)]
    assert series["eval_accuracy"] == [(4, 0.75)] and "eval_rewards_chosen" not in series
    assert plot_losses(rows, tmp_path / "loss.png") is None
    assert (tmp_path / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert _preference_series([{"step": 1, "loss": 1.0}]) == {}  # an SFT run: one panel, as before


def test_pairs_are_planned_at_twice_the_length(tiny_llama: Path) -> None:
    """The memory plan and the padding-free budget of a preference run count both sequences of a pair."""
    from loratune.train.run import check_memory, planned

    base = [f"model.path={tiny_llama}", "data.max_length=128", "train.batch_size=2"]
    sft_cfg, sft = check_memory(load_config(None, base))
    cfg, pref = check_memory(load_config(None, [*base, "train.method=dpo"]))
    assert cfg.data.max_length == 128 and cfg.train.batch_size == 2  # the data is cut as configured
    assert pref.tokens_per_batch == 2 * sft.tokens_per_batch == 512 and pref.max_length == 256
    explicit = planned(load_config(None, [*base, "train.method=kto", "train.tokens_per_batch=300"]))
    assert explicit.train.tokens_per_batch == 600 and explicit.data.max_length == 256
    assert planned(sft_cfg) is sft_cfg


@pytest.mark.parametrize("method", ["dpo", "kto"])
def test_precomputed_reference_gives_the_same_step(tiny_llama: Path, method: str) -> None:
    """preference.reference precomputed: the reference log-probs computed once give the step computed on the fly."""
    from loratune.pref.reference import precompute_reference

    data = KTO if method == "kto" else PAIRS
    cfg = load_config(None, [f"model.path={tiny_llama}", f"data.datasets=[{{path: {data}, max_samples: 6}}]",
                             f"train.method={method}"])
    samples = prepare_preference_data(cfg.data, *load_tokenizer(cfg.model), 0, method, log_stats=False).train
    results = []
    for precomputed in (False, True):
        loop = build_loop(tiny_llama, samples, "adapter.rank=4", "adapter.dropout=0", "quantization.bits=32",
                          "train.batch_size=3", "train.grad_accum=2", f"train.method={method}")
        b = loop.batching
        loop.batching = PreferenceBatching(b.padding_free, b.batch_size, 2 * b.tokens, b.pad_id)
        loop.objective = Preference(method, PreferenceConfig())
        for s in samples:
            s.ref = None
        if precomputed:
            precompute_reference(loop.objective, loop.runner, loop.batching, samples)
            assert all(s.ref is not None and all(math.isfinite(x) for x in s.ref) for s in samples)
        batches = loop.batches([[0, 1, 2], [3, 4, 5]])
        assert all(("ref_logps" in batch) == precomputed for batch in batches)
        loss, _ = loop.forward_backward(batches)
        results.append((loss, torch.cat([p.grad.flatten() for p in loop.params]), dict(loop.stats)))
    (loss_a, grad_a, stats_a), (loss_b, grad_b, stats_b) = results
    assert loss_b == pytest.approx(loss_a, rel=1e-6, abs=1e-7)
    assert float((grad_a - grad_b).abs().max()) < 1e-6 * max(1.0, float(grad_a.abs().max()))
    assert stats_b["rewards_chosen"] == pytest.approx(stats_a["rewards_chosen"], abs=1e-6)


def test_a_run_with_precomputed_reference(tmp_path: Path, tiny_llama: Path) -> None:
    path = write_run_yaml(tmp_path, tiny_llama, preference={"reference": "precomputed"},
                          **_sections("dpo", max_steps=2, save_every=0, eval_every=2))
    result = train(config(path))
    evals = [r for r in read_rows(result.out_dir / "metrics.jsonl") if "eval_loss" in r]
    assert result.steps == 2 and evals and math.isfinite(evals[-1]["eval_margin"])


def test_the_model_card_names_the_objective_and_its_units(tmp_path: Path, tiny_llama: Path) -> None:
    path = write_run_yaml(tmp_path, tiny_llama, preference={"label_smoothing": 0.1},
                          **_sections("dpo", max_steps=1, save_every=0))
    text = (train(config(path)).out_dir / "README.md").read_text()
    assert "| objective | dpo (sigmoid), beta 0.1, label smoothing 0.1, reference: the base with the adapter " \
           "disabled |" in text
    assert "4 pairs" in text and "mean loss per pair" in text and "supervised token" not in text
