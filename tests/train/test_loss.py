"""The chunked head + cross-entropy equals the full-logits reference, in value and gradient."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from loratune.config import load_config
from loratune.model.adapters import attach_adapters
from loratune.model.load import load_base
from loratune.train.loss import IGNORE, chunked_linear_ce_sum, full_logits_loss_sum, lm_loss_sum, shift_labels


@pytest.mark.parametrize("softcap", [None, 30.0])
def test_chunked_matches_full(softcap: float | None) -> None:
    g = torch.Generator().manual_seed(0)
    h = torch.randn(3, 50, 16, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(97, 16, generator=g, dtype=torch.float64, requires_grad=True)
    t = torch.randint(0, 97, (3, 50), generator=g)
    t[0, :10] = IGNORE
    got = chunked_linear_ce_sum(h, w, t, softcap=softcap, chunk_rows=7)
    logits = (h @ w.T).double()
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    want = F.cross_entropy(logits.reshape(-1, 97), t.reshape(-1), ignore_index=IGNORE, reduction="sum")
    assert torch.allclose(got, want, rtol=1e-10)
    gh, gw = torch.autograd.grad(got, (h, w))
    eh, ew = torch.autograd.grad(want, (h, w))
    assert torch.allclose(gh, eh, rtol=1e-9, atol=1e-12) and torch.allclose(gw, ew, rtol=1e-9, atol=1e-12)


def test_shift_labels() -> None:
    labels = torch.tensor([[1, 2, 3, IGNORE], [IGNORE, 5, 6, 7]])
    assert shift_labels(labels).tolist() == [[2, 3, IGNORE, IGNORE], [5, 6, 7, IGNORE]]


@pytest.mark.parametrize("family", ["llama", "gemma", "qwen2"])
def test_model_loss_equals_hf_loss(tiny_models: dict[str, Path], family: str) -> None:
    cfg = load_config(None, [f"model.path={tiny_models[family]}", "adapter.rank=4", "adapter.dropout=0"])
    model = attach_adapters(load_base(cfg), cfg.adapter)
    ids = torch.randint(5, 400, (2, 24), generator=torch.Generator().manual_seed(2))
    labels = ids.clone()
    labels[0, :7] = IGNORE
    mask = torch.ones_like(ids)
    mask[1, 20:] = 0
    labels[1, 20:] = IGNORE
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    ours, n = lm_loss_sum(model, batch)
    ref, n_ref = full_logits_loss_sum(model, batch)
    hf = model(input_ids=ids, attention_mask=mask, labels=labels).loss
    assert n == n_ref == int((labels[:, 1:] != IGNORE).sum())
    assert torch.allclose(ours, ref, rtol=1e-5)
    assert torch.allclose(ours / n, hf, rtol=1e-5)
