"""When `GraphedMicroBatch` replays, captures or declines, checked on the CPU with the CUDA parts stubbed.

The capture and replay themselves run only on a GPU (tests/gpu, tests/train/test_graphs_gpu.py); the policy
around them (which micro-batches are eager warm-ups, which one is timed, when a new shape starts over, what
is never graphed) is plain Python and is pinned here.
"""

from __future__ import annotations

import torch

from loratune.kernels.graphs import GraphedMicroBatch


class Stubbed(GraphedMicroBatch):
    """The policy of GraphedMicroBatch with capture and replay replaced by records."""

    def __init__(self, capture_ok: bool = True) -> None:
        super().__init__(torch.nn.Linear(2, 2), lambda m, b: torch.zeros(()), enabled=False)
        self.enabled, self.capture_ok, self.events = True, capture_ok, []

    def _choose(self, key, batch) -> bool:
        self.events.append(("capture", key[0], self.eager_seconds))
        if not self.capture_ok:
            self.failed.add(key)
            return False
        self.key = key
        return True

    def _replay(self, batch, scale):
        self.events.append(("replay", tuple(batch["input_ids"].shape)))
        self.replays += 1
        return torch.tensor(1.0)


def batch(rows: int, cols: int, **extra) -> dict[str, torch.Tensor]:
    """A padding-free stream of the decoder (rows x cols tokens, two samples a row)."""
    ids = torch.ones(rows, cols, dtype=torch.long)
    positions = torch.cat([torch.arange(cols // 2), torch.arange(cols - cols // 2)]).repeat(rows, 1)
    return {"input_ids": ids, "labels": ids, "position_ids": positions, **extra}


def test_two_eager_micro_batches_then_capture_then_replays() -> None:
    g = Stubbed()
    assert g.run(batch(2, 8), 0.1) is None and not g.timing  # warm-up
    assert g.run(batch(2, 8), 0.1) is None and g.timing  # timed eager run
    g.eager_took(0.25)
    assert g.run(batch(2, 8), 0.1) is not None and g.run(batch(2, 8), 0.1) is not None
    assert g.events == [("capture", (2, 8), 0.25), ("replay", (2, 8)), ("replay", (2, 8))]


def test_a_new_shape_starts_over_and_the_eager_time_is_its_own() -> None:
    g = Stubbed()
    for _ in range(3):
        g.run(batch(2, 8), 1.0)
    g.eager_took(9.0)  # reported for no timed run: ignored
    assert g.run(batch(1, 16), 1.0) is None and g.run(batch(1, 16), 1.0) is None
    assert g.timing and g.eager_seconds == float("inf")  # the 9.0 above was not taken: no run was being timed
    g.eager_took(0.5)
    assert g.run(batch(1, 16), 1.0) is not None
    assert g.events[-2] == ("capture", (1, 16), 0.5)
    assert g.run(batch(2, 8), 1.0) is None  # the old shape is a new sighting again (one graph is kept)


def test_padded_rows_unknown_keys_and_failed_shapes_stay_eager() -> None:
    g = Stubbed()
    padded = {k: v for k, v in batch(2, 8).items() if k != "position_ids"}
    for _ in range(4):
        assert g.run({**padded, "attention_mask": torch.ones(2, 8, dtype=torch.long)}, 1.0) is None
        assert g.run(batch(2, 8, extra_key=torch.zeros(1)), 1.0) is None
    assert g.events == []
    failing = Stubbed(capture_ok=False)
    for _ in range(6):
        assert failing.run(batch(2, 8), 1.0) is None
    assert [e[0] for e in failing.events] == ["capture"]  # tried once, then eager for good


def test_only_streams_have_a_key() -> None:
    """A stream's key is its shape (its sample boundaries are read on the GPU); padded rows have none."""
    g = Stubbed()
    assert g._key(batch(1, 8)) == ((1, 8), ("input_ids", "labels", "position_ids"))
    assert g._key({k: v for k, v in batch(1, 8).items() if k != "position_ids"}) is None


def test_flat_grads_are_views_of_one_buffer_per_dtype() -> None:
    """The graph's gradient tensors: zeroed views into one buffer per dtype (zeroing them is one kernel)."""
    from loratune.kernels.graphs import _flat_grads

    params = [torch.nn.Parameter(torch.randn(3, 4)), torch.nn.Parameter(torch.randn(5)),
              torch.nn.Parameter(torch.randn(2, 2, dtype=torch.float64)), torch.nn.Parameter(torch.randn(4, 3))]
    views, flat = _flat_grads(params)
    assert [v.shape for v in views] == [p.shape for p in params] and [v.dtype for v in views] == [p.dtype for p in params]
    assert sorted(b.numel() for b in flat) == [4, 12 + 5 + 12]
    assert all(not v.any() for v in views)
    for i, v in enumerate(views):
        v.fill_(i + 1)
    f32 = next(b for b in flat if b.dtype == torch.float32)
    assert f32.tolist() == [1.0] * 12 + [2.0] * 5 + [4.0] * 12
    for p, v in zip(params, views):
        p.grad = v  # accepted as gradients
    for b in flat:
        b.zero_()
    assert all(not p.grad.any() for p in params)


def test_zero_grads_in_place_only_while_attached() -> None:
    from loratune.kernels.graphs import _flat_grads

    model = torch.nn.Linear(3, 2)
    graphs = GraphedMicroBatch(model, lambda m, b: m(b).sum(), enabled=False)
    assert not graphs.zero_grads()  # nothing captured: the caller zeroes
    graphs.grads, graphs.flat = _flat_grads(graphs.params)
    for p, g in zip(graphs.params, graphs.grads):
        p.grad = g
    model(torch.ones(1, 3)).sum().backward()
    assert any(p.grad.any() for p in model.parameters())
    assert graphs.zero_grads() and all(not p.grad.any() for p in model.parameters())
    assert all(p.grad is g for p, g in zip(graphs.params, graphs.grads))  # still attached
    model.weight.grad = None
    assert not graphs.zero_grads()
