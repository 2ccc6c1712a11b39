"""The loop: token-normalised accumulation, the non-finite guard, and loss going down."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from train_helpers import build_loop, config, write_run_yaml

from loratune.data.sample import Sample
from loratune.train.loop import Loop, LoopState, TrainingError
from loratune.train.metrics import read_rows
from loratune.train.run import train


def _samples(n: int = 8) -> list[Sample]:
    g = torch.Generator().manual_seed(0)
    out = []
    for i in range(n):
        length = 5 + 4 * i  # unequal lengths: 5 .. 33
        ids = torch.randint(5, 400, (length,), generator=g).tolist()
        labels = list(ids)
        labels[: 2 + i % 3] = [-100] * (2 + i % 3)  # an unsupervised prompt of varying length
        out.append(Sample(ids, labels))
    return out


def _loop(tiny_llama: Path, batch_size: int, grad_accum: int, impl: str = "loratune", batching: str = "padded",
          **train) -> Loop:
    return build_loop(tiny_llama, _samples(), "adapter.rank=4", "adapter.dropout=0", f"model.implementation={impl}",
                      f"train.batching={batching}", "data.max_length=64", f"train.batch_size={batch_size}",
                      f"train.grad_accum={grad_accum}", "train.max_steps=4", "train.optimizer=adamw",
                      "train.max_grad_norm=0", *(f"train.{k}={v}" for k, v in train.items()))


def _grads(loop: Loop) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in loop.runner.module.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("impl", ["loratune", "transformers"])
@pytest.mark.parametrize("batching", ["padded", "padding_free"])
def test_batch_8_x_accum_1_equals_batch_1_x_accum_8(tiny_llama: Path, impl: str, batching: str) -> None:
    """The same 8 samples in one micro-batch or in eight (padding-free: a token budget that holds one sample at
    a time): the same token-normalised loss and gradients."""
    big = _loop(tiny_llama, 8, 1, impl, batching)
    batches = big.batches([list(range(8))])
    loss_big, n_big = big.forward_backward(batches)
    small = _loop(tiny_llama, 1, 8, impl, batching, tokens_per_batch=64)
    small_batches = small.batches([[i] for i in range(8)])
    # padding-free: lengths 5, 9, .., 33 best-fit into 64 tokens: [33, 29], [25, 21, 17], [13, 9, 5]
    assert len(batches) == 1 and len(small_batches) == (8 if batching == "padded" else 3)
    loss_small, n_small = small.forward_backward(small_batches)
    assert n_big == n_small == sum(sum(t != -100 for t in s.labels[1:]) for s in _samples())
    assert loss_big == pytest.approx(loss_small, rel=1e-5)
    gb, gs = _grads(big), _grads(small)
    for name in gb:
        assert torch.allclose(gb[name], gs[name], rtol=1e-4, atol=1e-7), name

    # the test can tell: averaging per-micro-batch means (the common mistake) gives other gradients
    naive = _loop(tiny_llama, 1, 1, impl, "padded")
    for i in range(8):
        loss_sum, n = naive.runner.loss_sum(naive.batches([[i]])[0])
        (loss_sum / n / 8).backward()
    worst = max(float((naive.runner.module.get_parameter(n).grad - gb[n]).abs().max() / gb[n].abs().max())
                for n in gb)
    assert worst > 1e-2


def _poisoned(loop: Loop, calls: set[int]) -> Loop:
    """Make the micro-batches numbered in `calls` (from 1) return an infinite loss."""
    count = {"n": 0}
    real = loop.runner.loss_sum

    def loss_sum(batch):
        count["n"] += 1
        loss, n = real(batch)
        return (loss * float("inf"), n) if count["n"] in calls else (loss, n)

    loop.runner.loss_sum = loss_sum
    return loop


def test_non_finite_loss_skips_exactly_that_step(tiny_llama: Path) -> None:
    loop = _poisoned(_loop(tiny_llama, 2, 2), {3})  # micro-batch 3 is in step 2
    state = LoopState()
    steps = list(loop.windows(state))
    r1 = loop.step(state, steps[0][2])
    before = {n: p.detach().clone() for n, p in loop.runner.module.named_parameters() if p.requires_grad}
    opt_state = {k: v["step"].clone() for k, v in loop.optimizer.state.items()}
    r2 = loop.step(state, steps[1][2])
    assert not r1.skipped and r2.skipped and state.skipped_steps == 1 and state.nonfinite_in_row == 1
    assert all(torch.equal(p, before[n]) for n, p in loop.runner.module.named_parameters() if p.requires_grad)
    assert all(torch.equal(v["step"], opt_state[k]) for k, v in loop.optimizer.state.items())
    assert all(p.grad is None for p in loop.params)  # nothing of the bad step leaks into the next
    r3 = loop.step(state, steps[2][2])
    assert not r3.skipped and state.nonfinite_in_row == 0 and state.step == 3


def test_too_many_non_finite_steps_in_a_row_stop_with_advice(tiny_llama: Path) -> None:
    loop = _poisoned(_loop(tiny_llama, 2, 1, max_nonfinite=3), set(range(1, 100)))
    state = LoopState()
    with pytest.raises(TrainingError, match="3 steps in a row.*bf16.*lower train.lr"):
        for _, _, window in loop.windows(state):
            loop.step(state, window)
    assert state.step == 3


def test_an_update_that_makes_weights_non_finite_stops_the_run(tiny_llama: Path, monkeypatch) -> None:
    loop = _loop(tiny_llama, 2, 1)
    real_step = loop.optimizer.step

    def overflowing_step(*a, **k):
        real_step(*a, **k)
        with torch.no_grad():
            loop.params[0][0, 0] = float("inf")

    monkeypatch.setattr(loop.optimizer, "step", overflowing_step)
    with pytest.raises(TrainingError, match="became NaN/inf in the update of step 1"):
        loop.step(LoopState(), next(loop.windows(LoopState()))[2])


def test_injected_inf_is_caught_within_one_step_and_nothing_non_finite_is_saved(
        tmp_path: Path, tiny_llama: Path, monkeypatch, caplog) -> None:
    monkeypatch.setenv("LORATUNE_FAULT", "nan@loss#2")  # one padding-free micro-batch a step: the 2nd is step 2
    from safetensors.torch import load_file

    result = train(config(write_run_yaml(tmp_path, tiny_llama)))
    rows = [r for r in read_rows(tmp_path / "out" / "metrics.jsonl") if "loss" in r]
    assert rows[1]["step"] == 2 and rows[1]["loss"] is None and rows[1]["skipped"] == 1
    assert rows[0]["skipped"] == 0 and all(r["loss"] is not None for r in rows[2:])
    assert "step 2: non-finite loss or gradient, step skipped" in caplog.text
    assert result.steps == 8
    for f in [tmp_path / "out" / "adapter_model.safetensors", *(tmp_path / "out" / "checkpoints").rglob("*.safetensors")]:
        assert all(torch.isfinite(t).all() for t in load_file(str(f)).values() if t.is_floating_point()), f


def test_non_finite_weights_are_never_saved(tmp_path: Path, tiny_llama: Path) -> None:
    from loratune.train.run_folder import NonFiniteWeights
    from loratune.train.interrupt import GracefulStop
    from loratune.train.run import Run

    run = Run(config(write_run_yaml(tmp_path, tiny_llama)), GracefulStop())
    with torch.no_grad():
        next(p for p in run.parts.model.module.parameters() if p.requires_grad)[0, 0] = float("nan")
    with pytest.raises(NonFiniteWeights, match="NaN or inf"):
        run.save_checkpoint()
    root = tmp_path / "out" / "checkpoints"
    assert not root.exists() or not list(root.iterdir())


def test_loss_decreases(tmp_path: Path, tiny_llama: Path) -> None:
    result = train(config(write_run_yaml(tmp_path, tiny_llama), "train.max_steps=12", "train.lr=1e-2",
                          "train.eval_every=4", "train.save_every=0"))
    rows = read_rows(tmp_path / "out" / "metrics.jsonl")
    evals = [r["eval_loss"] for r in rows if "eval_loss" in r]
    train_losses = [r["loss"] for r in rows if "loss" in r]
    assert len(evals) == 3 and evals[0] > evals[1] > evals[2]
    assert sum(train_losses[-3:]) < sum(train_losses[:3])
    assert result.last_loss < result.first_loss


def test_a_skipped_first_step_neither_warns_nor_moves_the_schedule(tiny_llama: Path) -> None:
    import warnings

    loop = _poisoned(_loop(tiny_llama, 2, 1, warmup_steps=2), {1})  # the very first step is bad
    state = LoopState()
    windows = [w for _, _, w in loop.windows(state)]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # PyTorch's "lr_scheduler.step() before optimizer.step()" among others
        r1 = loop.step(state, windows[0])
        r2 = loop.step(state, windows[1])
    assert r1.skipped and not r2.skipped
    assert r1.lr == r2.lr == pytest.approx(2e-4 / 3)  # the first warmup lr is used by the first real update


def test_tokens_per_second_counts_real_tokens_of_packed_rows(tiny_llama: Path) -> None:
    from loratune.data.collate import collate

    loop = _loop(tiny_llama, 2, 2)
    a, b, c = _samples(3)
    # packed rows as the packing stage builds them: several samples, positions restarting at 0 for each
    row1 = Sample(a.input_ids + b.input_ids, a.labels + b.labels, list(range(len(a))) + list(range(len(b))))
    row2 = Sample(c.input_ids, c.labels, list(range(len(c))))
    loop.samples = [row1, row2, row1, row2]
    window = [[0, 1], [2, 3]]
    real = 2 * (len(a) + len(b) + len(c))
    padded = sum(b_["input_ids"].numel() for b_ in loop.batches(window))
    assert "attention_mask" not in collate([row1, row2], 1) and padded > real  # the case that was miscounted
    assert loop.input_tokens(window) == real
    assert loop.step(LoopState(), window).input_tokens == real
