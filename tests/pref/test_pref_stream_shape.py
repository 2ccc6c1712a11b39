"""Preference micro-batches of one shape: on CUDA, loratune's decoder pads every method's padding-free streams to the
token budget (`Resolved.pad_streams`), as SFT's, so compiled FlexAttention compiles once per grad mode instead of
once per new stream length (the H200's 26 s first DPO step). The padding is a segment of its own with no label:
no numbered sequence, no unit, no change to any loss, metric or gradient (checked here on CPU)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from train_helpers import build_loop

from loratune.config import PreferenceConfig, load_config
from loratune.data.preference import prepare_preference_data
from loratune.model.load import load_tokenizer
from loratune.model.memory import load_model_config
from loratune.model.resolve import decide
from loratune.pref.batching import PreferenceBatching
from loratune.pref.objective import make_objective
from loratune.pref.reward import attach_reward_head
from loratune.train.run import make_batching, planned

ROOT = Path(__file__).parents[2]
PAIRS = ROOT / "examples" / "data" / "preference.jsonl"
KTO = ROOT / "examples" / "data" / "kto.jsonl"
METHODS = ["dpo", "kto", "orpo", "simpo", "rm"]


@pytest.mark.parametrize("method", METHODS)
def test_every_method_pads_its_streams_on_cuda(tiny_llama: Path, method: str) -> None:
    data = KTO if method == "kto" else PAIRS
    cfg = load_config(None, [f"model.path={tiny_llama}", f"data.datasets=[{{path: {data}}}]", "data.max_length=64",
                             f"train.method={method}", "model.implementation=loratune", "train.batch_size=2"])
    cuda, cpu = (decide(planned(cfg), device, load_model_config(cfg)) for device in ("cuda", "cpu"))
    assert cuda.pad_streams and not cpu.pad_streams
    assert not cuda.graphs  # graph replay stays SFT's (its loss function reads a plain token stream)
    batching = make_batching(cfg, cuda, pad_id=0)
    assert isinstance(batching, PreferenceBatching) and batching.pad_to_budget
    assert cuda.tokens_per_batch == 2 * 2 * 64  # two pairs of two sequences of up to max_length
    samples = prepare_preference_data(cfg.data, *load_tokenizer(cfg.model), 0, "kto" if method == "kto" else "dpo",
                                      log_stats=False).train[:5]
    batches = batching.micro_batches(samples, [[0, 1], [2, 3], [4]])
    assert {tuple(b["input_ids"].shape) for b in batches} == {(1, cuda.tokens_per_batch)}
    objective = make_objective(method, PreferenceConfig())
    assert sum(objective.units(b) for b in batches) == 5  # the padding is no pair (completion)


@pytest.mark.parametrize("method", METHODS)
def test_padding_to_the_budget_changes_no_loss_metric_or_gradient(tiny_llama: Path, method: str) -> None:
    data = KTO if method == "kto" else PAIRS
    cfg = load_config(None, [f"model.path={tiny_llama}", f"data.datasets=[{{path: {data}, max_samples: 6}}]"])
    samples = prepare_preference_data(cfg.data, *load_tokenizer(cfg.model), 0, "kto" if method == "kto" else "dpo",
                                      log_stats=False).train[:4]
    loop = build_loop(tiny_llama, samples, "adapter.rank=4", "adapter.dropout=0", "quantization.bits=32",
                      "train.batching=padding_free", "train.batch_size=2", "train.grad_accum=2",
                      f"train.method={method}")
    if method == "rm":
        attach_reward_head(loop.runner.module, 0)
    loop.objective = make_objective(method, PreferenceConfig())
    budget = 2 * loop.batching.tokens
    results = {}
    for pad in (False, True):
        loop.batching = PreferenceBatching(True, 2, budget, loop.batching.pad_id, pad_to_budget=pad)
        batches = loop.batches([[0, 1], [2, 3]])
        assert all(b["input_ids"].shape[1] == budget for b in batches) == pad
        loss, n = loop.forward_backward(batches)
        grads = torch.cat([p.grad.flatten() for p in loop.params])
        results[pad] = (loss, n, dict(loop.stats), grads)
        loop.runner.module.zero_grad(set_to_none=True)
    (loss0, n0, stats0, g0), (loss1, n1, stats1, g1) = results[False], results[True]
    assert n0 == n1 == 4 and g0.abs().max() > 0
    assert loss1 == pytest.approx(loss0, rel=1e-6, abs=1e-9)
    assert stats1.keys() == stats0.keys() and all(stats1[k] == pytest.approx(stats0[k], rel=1e-5, abs=1e-7)
                                                  for k in stats0)
    assert float((g1 - g0).abs().max()) <= 1e-5 * float(g0.abs().max())


def test_the_reference_pass_reuses_the_policy_passs_boundaries() -> None:
    """The decoder runner keeps the last stream's boundaries (and the masks built on them) for another pass over
    the same position ids, as a preference method's reference pass makes; another stream gets its own."""
    from loratune.train.runner import DecoderRunner

    runner = DecoderRunner(torch.nn.Module(), torch.device("cpu"))
    pos = torch.tensor([[0, 1, 2, 0, 1, 0, 1, 2, 3]])
    batch = {"input_ids": torch.zeros(1, 9, dtype=torch.long), "position_ids": pos}
    first = runner.boundaries(batch)
    assert first.lengths == (3, 2, 4)
    first.dense_mask(None)
    again = runner.boundaries({k: v for k, v in batch.items()})  # the objective's own dict of the same tensors
    assert again is first and ("dense", None) in again._derived
    other = runner.boundaries({**batch, "position_ids": pos.clone()})
    assert other is not first and other.lengths == first.lengths
