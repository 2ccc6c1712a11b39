"""Padding-free micro-batches: samples laid end to end with their boundaries, the same training as padded rows.

What is checked (fp32 on CPU): the stream layout (labels never cross samples, positions restart, a packed row
keeps its own samples, optional padding to a fixed length is a segment of its own); the regrouping of a step
into streams under a token budget; padded and padding-free steps give the same token-normalised loss and
LoRA gradients on both model codes; a packed step's gradients are those of each sample run alone; a stream
padded to the budget changes nothing; whole runs give the same per-step losses either way.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from train_helpers import build_loop, config, write_run_yaml

from loratune.data.collate import Batching, collate_stream, segment_lengths, segments
from loratune.data.packing import fill
from loratune.data.render import IGNORE
from loratune.data.sample import Sample
from loratune.train.metrics import read_rows
from loratune.train.run import train

REL = 1e-5


def _samples(lengths=(5, 9, 13, 17, 21, 25, 29, 33), seed: int = 0) -> list[Sample]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for i, n in enumerate(lengths):
        ids = torch.randint(5, 400, (n,), generator=g).tolist()
        labels = list(ids)
        labels[: 2 + i % 3] = [IGNORE] * (2 + i % 3)  # an unsupervised prompt of varying length
        out.append(Sample(ids, labels))
    return out


def test_a_stream_lays_samples_end_to_end_and_no_label_crosses_them() -> None:
    a = Sample([10, 11, 12], [10, 11, 12])  # supervised from its first token: that label is dropped
    packed = Sample([20, 21, 30, 31, 32], [IGNORE, 21, IGNORE, 31, 32], [0, 1, 0, 1, 2])  # a packed row of two
    b = collate_stream([a, packed], pad_id=7)
    assert b["input_ids"].tolist() == [[10, 11, 12, 20, 21, 30, 31, 32]]
    assert b["labels"].tolist() == [[IGNORE, 11, 12, IGNORE, 21, IGNORE, 31, 32]]
    assert b["position_ids"].tolist() == [[0, 1, 2, 0, 1, 0, 1, 2]]
    assert segment_lengths(b["position_ids"]) == [3, 2, 3] and segments(packed) == [2, 3] and segments(a) == [3]
    assert "attention_mask" not in b  # transformers derives the per-sample mask from the positions only then

    fixed = collate_stream([a, packed], pad_id=7, pad_to=11)  # padding: a segment of its own, no labels
    assert fixed["input_ids"].tolist() == [[10, 11, 12, 20, 21, 30, 31, 32, 7, 7, 7]]
    assert fixed["labels"][0, 8:].tolist() == [IGNORE] * 3 and fixed["position_ids"][0, 8:].tolist() == [0, 1, 2]
    assert segment_lengths(fixed["position_ids"]) == [3, 2, 3, 3]
    with pytest.raises(ValueError, match="holds 8 tokens, more than the 6"):
        collate_stream([a, packed], pad_id=7, pad_to=6)


def test_a_step_is_regrouped_under_the_token_budget_every_sample_once() -> None:
    samples = _samples()
    window = [[7, 0], [3, 5], [1, 6], [2, 4]]  # 4 padded micro-batches of 2 (batch_order's lists)
    padded = Batching(False, 2, 0, pad_id=1).micro_batches(samples, window)
    assert [tuple(b["input_ids"].shape) for b in padded] == [(2, 33), (2, 25), (2, 29), (2, 21)]
    free = Batching(True, 2, 66, pad_id=1)
    groups = free.groups(samples, [i for idx in window for i in idx])
    assert sorted(i for g in groups for i in g) == list(range(8))
    assert all(sum(len(samples[i]) for i in g) <= 66 for g in groups) and len(groups) == 3  # 152 tokens in 3
    streams = free.micro_batches(samples, window)
    assert [b["input_ids"].shape[1] for b in streams] == [sum(len(samples[i]) for i in g) for g in groups]
    again = free.micro_batches(samples, window)  # a pure function of the window: what exact resume needs
    assert [b["input_ids"].tolist() for b in again] == [b["input_ids"].tolist() for b in streams]
    assert fill([5, 9, 3], 9) == [[1], [0, 2]]  # best fit: 9 alone, then 5 and 3
    with pytest.raises(ValueError, match="item 0 has 12 tokens, more than the capacity 9"):
        fill([12], 9)


def _step(loop, window) -> tuple[float, int, dict[str, torch.Tensor]]:
    loss, n = loop.forward_backward(loop.batches(window))
    grads = {k: p.grad.clone() for k, p in loop.runner.module.named_parameters() if p.requires_grad}
    return loss, n, grads


def _close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """The largest difference of any gradient relative to that gradient's largest entry."""
    assert a.keys() == b.keys() and a
    return max(float((a[k] - b[k]).abs().max() / b[k].abs().max()) for k in a)


OVERRIDES = ("adapter.rank=4", "adapter.dropout=0", "data.max_length=64", "train.batch_size=2", "train.grad_accum=4",
             "train.optimizer=adamw")


@pytest.mark.parametrize("impl", ["loratune", "transformers"])
def test_padded_and_padding_free_steps_give_the_same_loss_and_gradients(tiny_llama: Path, impl: str) -> None:
    window = [[7, 0], [3, 5], [1, 6], [2, 4]]
    padded = build_loop(tiny_llama, _samples(), *OVERRIDES, f"model.implementation={impl}", "train.batching=padded")
    free = build_loop(tiny_llama, _samples(), *OVERRIDES, f"model.implementation={impl}", "train.tokens_per_batch=66")
    assert len(padded.batches(window)) == 4 and len(free.batches(window)) == 3
    loss_p, n_p, g_p = _step(padded, window)
    loss_f, n_f, g_f = _step(free, window)
    assert n_p == n_f == sum(sum(t != IGNORE for t in s.labels[1:]) for s in _samples())
    assert loss_f == pytest.approx(loss_p, rel=REL)
    assert _close(g_f, g_p) < REL


def test_the_two_model_codes_train_alike(tiny_llama: Path) -> None:
    """The same adapter values on loratune's decoder and on transformers + peft: the same step (fp32)."""
    window = [[7, 0], [3, 5], [1, 6], [2, 4]]
    ours = build_loop(tiny_llama, _samples(), *OVERRIDES, "model.implementation=loratune")
    theirs = build_loop(tiny_llama, _samples(), *OVERRIDES, "model.implementation=transformers")
    loss_o, n_o, g_o = _step(ours, window)
    loss_t, n_t, g_t = _step(theirs, window)
    assert n_o == n_t and loss_o == pytest.approx(loss_t, rel=REL)
    peft_names = {k.replace("base_model.model.model.", "").replace("self_attn", "attn").replace(".default.weight", ""): v
                  for k, v in g_t.items()}
    assert _close(g_o, peft_names) < 1e-4  # 4-bit base dequantized by bitsandbytes there, by loratune here


def test_a_packed_step_gives_the_gradients_of_each_sample_alone(tiny_llama: Path) -> None:
    """One stream of 8 samples vs each sample as its own stream, losses summed and normalised the same way:
    attention and labels do not cross samples, positions restart, so the LoRA gradients agree."""
    samples = _samples()
    loop = build_loop(tiny_llama, samples, *OVERRIDES, "train.tokens_per_batch=256")
    loss_packed, n, g_packed = _step(loop, [list(range(8))])
    assert len(loop.batches([list(range(8))])) == 1
    loop.optimizer.zero_grad(set_to_none=True)
    runner, total = loop.runner, 0.0
    for s in samples:
        loss_sum, _ = runner.loss_sum(collate_stream([s], pad_id=1))
        (loss_sum / n).backward()
        total += float(loss_sum.detach())
    g_alone = {k: p.grad.clone() for k, p in runner.module.named_parameters() if p.requires_grad}
    assert loss_packed == pytest.approx(total, rel=REL)
    assert _close(g_packed, g_alone) < REL


def test_padding_the_stream_to_the_budget_changes_nothing(tiny_llama: Path) -> None:
    """A stream padded to a fixed length (one shape for every micro-batch): the padding is a sample of its own
    with no labels, so the loss and gradients are those of the unpadded stream."""
    samples = _samples()
    loop = build_loop(tiny_llama, samples, *OVERRIDES, "train.tokens_per_batch=200")
    loss, _, plain = _step(loop, [list(range(6))])
    loop.optimizer.zero_grad(set_to_none=True)
    loop.batching = Batching(True, 2, 200, pad_id=1, pad_to_budget=True)
    batches = loop.batches([list(range(6))])
    assert [b["input_ids"].shape[1] for b in batches] == [200]
    loss_fixed, _, fixed = _step(loop, [list(range(6))])
    assert loss_fixed == pytest.approx(loss, rel=REL) and _close(fixed, plain) < REL


def test_runs_give_the_same_losses_padded_and_padding_free(tmp_path: Path, tiny_llama: Path) -> None:
    """The whole run (adapter dropout 0, so no randomness depends on the layout): the same steps, epochs and
    supervised tokens, losses within 1e-5 relative step by step, eval loss too."""
    rows = {}
    for batching in ("padded", "padding_free"):
        folder = tmp_path / batching
        folder.mkdir()
        result = train(config(write_run_yaml(folder, tiny_llama), "adapter.dropout=0", f"train.batching={batching}",
                              "train.max_steps=5"))
        rows[batching] = read_rows(result.out_dir / "metrics.jsonl")
    padded, free = ([r for r in rows[k] if "loss" in r] for k in ("padded", "padding_free"))
    assert [r["step"] for r in padded] == [r["step"] for r in free] == [1, 2, 3, 4, 5]
    assert [(r["epoch"], r["tokens"]) for r in padded] == [(r["epoch"], r["tokens"]) for r in free]
    for a, b in zip(padded, free):
        assert b["loss"] == pytest.approx(a["loss"], rel=REL), a["step"]
    evals = [[r["eval_loss"] for r in rows[k] if "eval_loss" in r] for k in ("padded", "padding_free")]
    assert len(evals[0]) == 2 and evals[1] == pytest.approx(evals[0], rel=REL)
