"""Adapter dropout masks are a function of (seed, step, micro-batch): reseeded before each micro-batch, so neither
what ran before (a CUDA graph's warm-up, an evaluation, a resumed run's shorter history) nor eager vs replay
changes them (loratune.train.dropout_seeds)."""

from __future__ import annotations

from pathlib import Path

import torch
from train_helpers import build_loop

from loratune.data.sample import Sample
from loratune.train.dropout_seeds import DropoutSeeds, draws_random, micro_batch_seed


def _samples() -> list[Sample]:
    g = torch.Generator().manual_seed(0)
    out = []
    for n in (9, 13, 17, 21):
        ids = torch.randint(5, 400, (n,), generator=g).tolist()
        out.append(Sample(ids, [-100, -100] + ids[2:]))
    return out


def _loop(tiny_llama: Path, dropout: float):
    return build_loop(tiny_llama, _samples(), "adapter.rank=4", f"adapter.dropout={dropout}",
                      "model.implementation=loratune", "data.max_length=32", "train.batch_size=2",
                      "train.grad_accum=2", "train.max_steps=4", "train.optimizer=adamw")


def _grads(loop) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in loop.runner.module.named_parameters() if p.requires_grad}


def test_seeds_are_a_pure_function_of_seed_step_and_micro_batch() -> None:
    assert micro_batch_seed(42, 3, 1) == micro_batch_seed(42, 3, 1)
    seeds = {micro_batch_seed(s, step, m) for s in (0, 1, 42) for step in range(20) for m in range(8)}
    assert len(seeds) == 3 * 20 * 8  # no two micro-batches share masks
    assert all(0 <= s < 2 ** 63 for s in seeds)
    assert micro_batch_seed(0, 1, 0) != micro_batch_seed(0, 0, 1)  # step and micro-batch are not interchangeable


def test_the_masks_do_not_depend_on_what_drew_before() -> None:
    seeds = DropoutSeeds(7, "cpu")
    x = torch.ones(64, 32)
    seeds.before(5, 1)
    first = torch.nn.functional.dropout(x, 0.1, training=True)
    torch.rand(1000)  # e.g. a graph's warm-up pass or an evaluation drawing in between
    seeds.before(5, 1)
    again = torch.nn.functional.dropout(x, 0.1, training=True)
    assert torch.equal(first, again) and int((first == 0).sum()) > 0
    seeds.before(5, 2)
    assert not torch.equal(first, torch.nn.functional.dropout(x, 0.1, training=True))


def test_the_rank_deals_micro_batch_numbers() -> None:
    a, b = DropoutSeeds(7, "cpu", rank=1, world_size=2), DropoutSeeds(7, "cpu")
    a.before(3, 2)  # rank 1's third micro-batch: number 1 + 2 x 2 = 5 of the window
    x = torch.rand(32)
    b.before(3, 5)
    assert torch.equal(x, torch.rand(32))


def test_only_models_that_draw_random_numbers_are_reseeded(tiny_llama: Path) -> None:
    assert _loop(tiny_llama, 0.1).seeds is not None
    loop = _loop(tiny_llama, 0.0)
    assert loop.seeds is None and not draws_random(loop.runner.module)
    assert draws_random(torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Dropout(0.1)))


def test_a_steps_gradients_with_dropout_do_not_depend_on_the_history(tiny_llama: Path) -> None:
    """Step 3's gradients with dropout 0.1: the same in a loop that ran steps 0-2 first (and drew more random
    numbers in between) as in a fresh loop that starts there (a resumed run); another step's masks differ."""
    window = [[0, 1], [2, 3]]
    fresh = _loop(tiny_llama, 0.1)
    fresh.runner.module.train()
    loss_fresh, _ = fresh.forward_backward(fresh.batches(window), step=3)
    g_fresh = _grads(fresh)

    busy = _loop(tiny_llama, 0.1)
    busy.runner.module.train()
    for step in range(3):  # same weights: gradients only accumulate here, no optimizer step
        busy.forward_backward(busy.batches(window), step=step)
        torch.rand(777)
    busy.optimizer.zero_grad(set_to_none=True)
    loss_busy, _ = busy.forward_backward(busy.batches(window), step=3)
    assert loss_busy == loss_fresh
    g_busy = _grads(busy)
    assert all(torch.equal(g_busy[k], g_fresh[k]) for k in g_fresh)

    busy.optimizer.zero_grad(set_to_none=True)
    loss_other, _ = busy.forward_backward(busy.batches(window), step=4)
    assert loss_other != loss_fresh  # other masks (same weights, same data)
