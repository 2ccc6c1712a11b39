"""Which attention path `attend` takes, and that the shortcuts give the dense stream path's answer: rows of one
length through SDPA's own causal kernel (a padded batch, a single sample), streams too short for FlexAttention's
blocks through the SDPA path."""

from __future__ import annotations

import pytest
import torch

from loratune.decoder import attention
from loratune.decoder.attention import Boundaries, attend, dense_attention, equal_rows


def _dense(q, k, v, b):
    qh, kh, vh = (t.transpose(0, 1)[None] for t in (q, k, v))
    return dense_attention(qh, kh, vh, b.dense_mask(None)[None, None], 0.3)[0].transpose(0, 1)


@pytest.mark.parametrize(("lengths", "heads"), [([6, 6, 6], (4, 2, 2)), ([13], (4, 1, 1)), ([5, 5], (2, 2, 2))])
def test_equal_rows_equal_the_dense_stream(lengths, heads) -> None:
    b = Boundaries.from_lengths(lengths)
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(b.n_tokens, h, 8, generator=g, dtype=torch.float64, requires_grad=True) for h in heads)
    want = _dense(q, k, v, b)
    got = attend(q, k, v, b, scale=0.3, backend="sdpa")
    grad = torch.randn(want.shape, generator=g, dtype=torch.float64)
    gw = torch.autograd.grad(want, (q, k, v), grad)
    gg = torch.autograd.grad(got, (q, k, v), grad)
    assert (got - want).abs().max().item() < 1e-12
    assert max((a - c).abs().max().item() for a, c in zip(gg, gw)) < 1e-12


def test_which_streams_are_equal_rows() -> None:
    assert equal_rows(Boundaries.from_lengths([4, 4]), None, None)
    assert equal_rows(Boundaries.from_lengths([9]), None, None)
    assert not equal_rows(Boundaries.from_lengths([4, 3]), None, None)
    assert not equal_rows(Boundaries.from_lengths([4, 4]), 2, None)  # a window needs the mask
    assert not equal_rows(Boundaries.from_lengths([4, 4]), None, 30.0)  # so does a soft-cap
    assert not equal_rows(Boundaries.from_lengths([4, 4], offsets=[2, 2]), None, None)  # continuing a cache


def test_routes(monkeypatch) -> None:
    taken = []
    monkeypatch.setattr(attention, "_equal_rows", lambda *a: taken.append("rows") or a[0])
    for name in ("sdpa", "flex", "flash"):
        monkeypatch.setitem(attention._IMPLS, name, lambda *a, name=name: taken.append(name) or a[0])
    q, kv = torch.zeros(300, 2, 4), torch.zeros(300, 1, 4)

    def route(lengths, backend, **kw):
        taken.clear()
        n = sum(lengths)
        attend(q[:n], kv[:n], kv[:n], Boundaries.from_lengths(lengths), scale=1.0, backend=backend, **kw)
        return taken[0]

    assert route([150, 150], "flex") == "rows"
    assert route([150, 150], "sdpa") == "rows"
    assert route([150, 150], "flash") == "flash"  # varlen flash handles it natively
    assert route([150, 150], "flex", window=8) == "flex"
    assert route([200, 100], "flex") == "flex"
    assert route([60, 40], "flex") == "sdpa"  # under FlexAttention's block of 128 queries


def test_boundaries_made_on_the_device_are_the_hosts() -> None:
    """`Boundaries.on_device` (what a CUDA graph captures) finds the samples from the position ids alone."""
    lengths = [5, 1, 7, 3]
    host = Boundaries.from_lengths(lengths)
    dev = Boundaries.on_device(host.positions[None])
    assert dev.device_only and not host.device_only and dev.n_tokens == host.n_tokens == 16
    assert torch.equal(dev.sample_ids, host.sample_ids) and torch.equal(dev.positions, host.positions)
    assert torch.equal(dev.dense_mask(None), host.dense_mask(None))
    with pytest.raises(ValueError, match="longrope"):
        dev.extent()


@pytest.mark.parametrize("backend", ["sdpa", "flex", "flash"])
def test_device_boundaries_attend_as_the_hosts(backend) -> None:
    """Without host lengths every backend request lands on a path that needs none (the dense mask on the CPU),
    with the host boundaries' answer; equal rows are not taken for them (their test reads the lengths)."""
    host = Boundaries.from_lengths([6, 6, 6])
    dev = Boundaries.on_device(host.positions)
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(18, h, 8, generator=g, dtype=torch.float64) for h in (4, 2, 2))
    want = attend(q, k, v, host, scale=0.3, backend="sdpa")
    got = attend(q, k, v, dev, scale=0.3, backend=backend if backend != "flash" else "flash")
    assert not equal_rows(dev, None, None)
    assert (got - want).abs().max().item() < 1e-12
