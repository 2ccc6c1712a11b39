"""The training loss (hidden states -> chunked head + cross-entropy) equals the full-logits reference and HF's
own loss, in value and in the adapters' gradients."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from loratune.config import load_config
from loratune.model.adapters import attach_adapters
from loratune.model.load import load_base
from loratune.train.loss import IGNORE, full_logits_loss_sum, lm_loss_sum, shift_labels


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
    with torch.no_grad():  # a non-zero adapter, so that its gradients are informative
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05, generator=torch.Generator().manual_seed(len(name)))
    params = [p for p in model.parameters() if p.requires_grad]
    ours, n = lm_loss_sum(model, batch)
    got = torch.autograd.grad(ours / n, params)
    ref, n_ref = full_logits_loss_sum(model, batch)
    want = torch.autograd.grad(ref / n_ref, params)
    hf = model(input_ids=ids, attention_mask=mask, labels=labels).loss
    assert n == n_ref == int((labels[:, 1:] != IGNORE).sum()) == (23 - 6) + 19
    assert torch.allclose(ours, ref, rtol=1e-5)
    assert torch.allclose(ours / n, hf, rtol=1e-5)
    flat = lambda gs: torch.cat([g.flatten() for g in gs])  # noqa: E731
    assert float((flat(got) - flat(want)).norm() / flat(want).norm()) < 1e-4


def test_rows_counted_on_the_host_give_the_same_loss(tiny_models: dict[str, Path]) -> None:
    """`with_target_rows` (what the loop adds on the host) selects exactly the supervised rows."""
    from loratune.train.loss import TARGET_ROWS, with_target_rows

    cfg = load_config(None, [f"model.path={tiny_models['llama']}", "adapter.rank=4", "adapter.dropout=0"])
    model = attach_adapters(load_base(cfg), cfg.adapter)
    ids = torch.randint(5, 400, (2, 12), generator=torch.Generator().manual_seed(4))
    labels = ids.clone()
    labels[0, :5] = IGNORE
    labels[1, 9:] = IGNORE
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    rows = with_target_rows(batch)[TARGET_ROWS]
    assert rows.tolist() == [4, 5, 6, 7, 8, 9, 10] + [12 + i for i in range(8)]
    with torch.no_grad():
        got, n = lm_loss_sum(model, with_target_rows(batch))
        want, n_want = lm_loss_sum(model, batch)
    assert n == n_want == 15 and torch.equal(got, want)
