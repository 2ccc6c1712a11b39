"""Packed and unpacked batches give the same loss and gradients: proof that no attention crosses samples.

Real tiny models of each family, fp32 on CPU. The packed batch has no attention mask and position ids
that restart per sample (what `collate` produces); transformers then builds a block-diagonal causal
mask. The negative control packs the same rows *without* position ids: its per-token losses differ,
which shows the comparison is sensitive to leaks.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

from loratune.data.collate import collate
from loratune.data.packing import pack
from loratune.data.render import IGNORE, render_conversation
from loratune.data.sample import Sample
from loratune.data.templates import resolve_template

CONVS = [[{"role": "user", "content": f"Tell me about item {i}" + " and more" * (i % 4)},
          {"role": "assistant", "content": f"Item {i} is fine" + ", really" * (i % 3)}] for i in range(9)]


def token_losses(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Per-target-token cross-entropy, in the order of the supervised positions (shifted)."""
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    logits = model(**inputs, use_cache=False).logits.float()
    targets = F.pad(batch["labels"][:, 1:], (0, 1), value=IGNORE)
    keep = targets != IGNORE
    return F.cross_entropy(logits[keep], targets[keep], reduction="none")


def in_sample_order(batch_samples: list[Sample], losses: torch.Tensor, originals: list[list[int]]) -> list[float]:
    """Reorder per-token losses of a batch so that they line up sample by sample with `originals`' ids."""
    out, i = {}, 0
    for s in batch_samples:
        pos = s.position_ids or list(range(len(s)))
        starts = [t for t, p in enumerate(pos) if p == 0] + [len(s)]
        for a, b in zip(starts, starts[1:]):
            n = sum(1 for x in s.labels[a + 1:b] if x != IGNORE)
            out[tuple(s.input_ids[a:b])] = losses[i:i + n]
            i += n
    return torch.cat([out[tuple(ids)] for ids in originals])


@pytest.fixture(scope="module")
def models(tiny_models) -> dict:
    return {(fam, attn): AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32,
                                                              attn_implementation=attn)
            for fam, folder in tiny_models.items() for attn in ("sdpa", "eager")}


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral", "gemma"])
def test_packed_equals_unpacked(models: dict, toks: dict, family: str, attn: str) -> None:
    tok, info = toks[family]
    model = models[(family, attn)].eval()
    template = resolve_template("auto", tok)
    pairs = [render_conversation(c, template, tok, info) for c in CONVS]
    originals = [ids for ids, _ in pairs]
    unpacked = [Sample(ids, labels) for ids, labels in pairs]
    rows = pack(pairs, 96)
    assert len(rows) < len(pairs) and any(r.position_ids.count(0) > 1 for r in rows)  # really packed
    with torch.no_grad():
        ref = in_sample_order(unpacked, token_losses(model, collate(unpacked, info.pad_id)), originals)
        got = in_sample_order(rows, token_losses(model, collate(rows, info.pad_id)), originals)
        leaky_batch = collate(rows, info.pad_id)
        del leaky_batch["position_ids"]
        leaky = in_sample_order(rows, token_losses(model, leaky_batch), originals)
    assert got.shape == ref.shape
    assert abs(float(got.mean()) - float(ref.mean())) < 1e-4  # the same loss
    assert float((got - ref).abs().max()) < 1e-4  # token by token
    assert float((leaky - ref).abs().max()) > 1e-3  # the control: attention across samples is visible


def test_packed_equals_unpacked_training_step(models: dict, toks: dict) -> None:
    """Through the training loop's own loss function: same loss and same gradients, packed or not."""
    from loratune.train.loss import lm_loss_sum

    tok, info = toks["llama"]
    model = models[("llama", "sdpa")].train()
    template = resolve_template("auto", tok)
    pairs = [render_conversation(c, template, tok, info) for c in CONVS]

    def loss_and_grads(samples: list[Sample]) -> tuple[float, list[torch.Tensor]]:
        model.zero_grad(set_to_none=True)
        total, n = lm_loss_sum(model, collate(samples, info.pad_id))
        (total / n).backward()
        return float(total.detach() / n), [p.grad.clone() for p in model.parameters() if p.grad is not None]

    loss_u, grads_u = loss_and_grads([Sample(ids, labels) for ids, labels in pairs])
    loss_p, grads_p = loss_and_grads(pack(pairs, 96))
    model.zero_grad(set_to_none=True)
    assert abs(loss_u - loss_p) < 1e-4
    assert len(grads_u) == len(grads_p)
    for gu, gp in zip(grads_u, grads_p):
        assert torch.allclose(gu, gp, atol=1e-5, rtol=1e-3)
