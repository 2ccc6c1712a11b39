"""The SDPA path over padded rows of the samples (`Boundaries.padded_layout`): the dense stream path's answer
and gradients (fp64: to rounding; the soft-capped softmax is fp32), for many short samples, windows, soft-caps and grouped-query heads; chosen
only where it saves at least half the work."""

from __future__ import annotations

import pytest
import torch

from loratune.decoder import attention
from loratune.decoder.attention import Boundaries, _sdpa_rows, dense_attention


def _dense(q, k, v, b, window, softcap):
    qh, kh, vh = (t.transpose(0, 1)[None] for t in (q, k, v))
    return dense_attention(qh, kh, vh, b.dense_mask(window)[None, None], 0.3, softcap)[0].transpose(0, 1)


@pytest.mark.parametrize("window", [None, 5, 2])
@pytest.mark.parametrize("softcap", [None, 20.0])
def test_rows_equal_the_dense_stream(window, softcap) -> None:
    b = Boundaries.from_lengths([7, 3, 12, 2, 1, 9])
    n, g = b.n_tokens, torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(n, h, 8, generator=g, dtype=torch.float64, requires_grad=True) for h in (4, 2, 2))
    want = _dense(q, k, v, b, window, softcap)
    got = _sdpa_rows(q, k, v, b, 0.3, window, softcap, 0.0)
    grad = torch.randn(want.shape, generator=g, dtype=torch.float64)
    gw = torch.autograd.grad(want, (q, k, v), grad)
    gg = torch.autograd.grad(got, (q, k, v), grad)
    tol = 1e-12 if softcap is None else 1e-6  # the soft-capped path's softmax runs in fp32 (transformers' eager)
    assert (got - want).abs().max().item() < tol
    assert max((a - c).abs().max().item() for a, c in zip(gg, gw)) < tol


def test_every_padding_query_keeps_a_key() -> None:
    """No row of the padded mask is empty (some kernels give NaN for those), even with a narrow window."""
    b = Boundaries.from_lengths([9, 1, 4])
    mask = b.padded_mask(window=2)
    assert mask.shape == (3, 1, 9, 9) and bool(mask.any(dim=-1).all())
    _, valid = b.padded_layout()
    assert valid.sum().item() == 14 and mask[1, 0, 5].tolist() == [True] + [False] * 8  # padding: the first key


def test_the_rows_path_is_taken_where_it_saves_half_the_work(monkeypatch) -> None:
    calls = []
    monkeypatch.setattr(attention, "_sdpa_rows", lambda *a: calls.append(a[3].lengths) or a[0])
    q = torch.zeros(40, 2, 4)
    kv = torch.zeros(40, 1, 4)
    for lengths, rows in (([10] * 4, True), ([37, 3], False), ([40], False), ([20, 20], True)):
        calls.clear()
        attention._sdpa(q, kv, kv, Boundaries.from_lengths(lengths), 1.0, None, None, 0.0)
        assert bool(calls) == rows, lengths  # 2 S L^2 <= N^2
