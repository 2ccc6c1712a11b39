"""The building blocks: chunked per-token log-probs equal the full-logits ones (values and gradients) however the
rows are chunked; sequences are numbered from the host-side batch; and the reference policy (adapters disabled)
is the base model exactly, on both model codes, with the adapters back afterwards."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from loratune.config import load_config
from loratune.decoder import Boundaries
from loratune.decoder.load import decoder_from_hf
from loratune.decoder.lora import adapters_disabled
from loratune.model.adapters import attach_adapters
from loratune.model.load import load_base
from loratune.pref.logps import segments, sequence_logps, token_logps


@pytest.mark.parametrize("chunk", [7, 64, 1 << 25])
@pytest.mark.parametrize("softcap", [None, 5.0])
def test_chunked_log_probs_equal_full_logits(chunk: int, softcap: float | None) -> None:
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(13, 16, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(11, 16, generator=g, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 11, (13,), generator=g)
    upstream = torch.randn(13, generator=g, dtype=torch.float64)
    got = token_logps(hidden, weight, targets, softcap, chunk_elements=chunk)
    (gh, gw) = torch.autograd.grad((got * upstream).sum(), (hidden, weight))
    logits = hidden @ weight.t()
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    want = torch.log_softmax(logits, -1).gather(1, targets[:, None]).squeeze(1)
    (wh, ww) = torch.autograd.grad((want * upstream).sum(), (hidden, weight))
    assert torch.allclose(got, want, atol=1e-12)
    assert torch.allclose(gh, wh, atol=1e-12) and torch.allclose(gw, ww, atol=1e-12)


def test_sequences_are_numbered_from_the_batch() -> None:
    # a stream: [pair 1: 3 + 4 tokens][pair 2: 2 + 3 tokens][padding: 3 tokens]
    pos = torch.tensor([[0, 1, 2, 0, 1, 2, 3, 0, 1, 0, 1, 2, 0, 1, 2]])
    labels = torch.tensor([[-100, 5, 6, -100, -100, 7, 8, -100, 9, -100, 3, 4, -100, -100, -100]])
    rows, number, counts = segments({"labels": labels, "position_ids": pos})
    assert rows.tolist() == [0, 1, 4, 5, 7, 9, 10]  # positions whose next label is supervised
    assert number.tolist() == [0, 0, 1, 1, 2, 3, 3] and counts.tolist() == [2, 2, 1, 2]
    hidden = torch.randn(15, 4, dtype=torch.float64)
    weight = torch.randn(10, 4, dtype=torch.float64)
    got = sequence_logps(hidden, weight, labels, rows, number, 4)
    lp = torch.log_softmax(hidden @ weight.t(), -1)
    want = [lp[0, 5] + lp[1, 6], lp[4, 7] + lp[5, 8], lp[7, 9], lp[9, 3] + lp[10, 4]]
    assert torch.allclose(got, torch.stack(want))


@pytest.fixture(scope="module")
def pair(tiny_llama: Path):
    cfg = load_config(None, [f"model.path={tiny_llama}", "quantization.bits=32", "adapter.rank=4", "adapter.dropout=0"])
    hf = load_base(cfg)
    dec = decoder_from_hf(hf)
    ids = torch.randint(5, 400, (1, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        base_hf = hf(input_ids=ids).logits[0]
        base_dec = dec(ids.reshape(-1), Boundaries.from_lengths([20]))
    peft = attach_adapters(hf, cfg.adapter)
    dec.add_adapters(4, 16.0)
    with torch.no_grad():
        for p in list(peft.parameters()) + list(dec.parameters()):
            if p.requires_grad:
                p.normal_(0, 0.3, generator=torch.Generator().manual_seed(p.numel()))
    return peft, dec, ids, base_hf, base_dec


def test_adapters_disabled_is_the_base_model(pair) -> None:
    peft, dec, ids, base_hf, base_dec = pair
    b = Boundaries.from_lengths([20])
    with torch.no_grad():
        adapted = dec(ids.reshape(-1), b)
        with adapters_disabled(dec):
            with adapters_disabled(dec):  # re-entrant
                pass
            reference = dec(ids.reshape(-1), b)
        again = dec(ids.reshape(-1), b)
        with peft.disable_adapter():
            hf_reference = peft(input_ids=ids).logits[0]
    assert (adapted - base_dec).abs().max() > 1e-2  # the adapters change the model
    assert torch.equal(reference, base_dec) and torch.equal(again, adapted)
    assert torch.allclose(hf_reference, base_hf, atol=1e-6)
    assert all(m.adapter_enabled for m in dec.adapted_layers().values())


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.integers(2, 9), st.integers(0, 2 ** 9 - 1)), min_size=1, max_size=6),
       st.integers(0, 4), st.booleans())
def test_numbering_matches_a_plain_walk(seqs, pad: int, rows_layout: bool) -> None:
    """`segments` against a walk over the sequences: each sequence's supervised targets get its number, in order,
    whether the sequences form one stream (with trailing padding) or padded rows of a packed layout."""
    ids_lists, label_lists = [], []
    for n, mask in seqs:
        labels = [-100] + [7 if mask >> i & 1 else -100 for i in range(n - 1)]
        if all(x == -100 for x in labels):
            labels[-1] = 7
        ids_lists.append(list(range(n)))
        label_lists.append(labels)
    if rows_layout:  # two sequences per row, rows padded to the longest (positions restart in the padding)
        rows = [(ids_lists[i:i + 2], label_lists[i:i + 2]) for i in range(0, len(seqs), 2)]
        width = max(sum(len(x) for x in r[0]) for r in rows) + pad
        pos, lab = [], []
        for r_ids, r_labels in rows:
            p = [k for x in r_ids for k in range(len(x))]
            lab_row = [v for x in r_labels for v in x]
            pos.append(p + list(range(width - len(p))))
            lab.append(lab_row + [-100] * (width - len(lab_row)))
        batch = {"labels": torch.tensor(lab), "position_ids": torch.tensor(pos)}
    else:
        pos = [k for x in ids_lists for k in range(len(x))] + list(range(pad))
        lab = [v for x in label_lists for v in x] + [-100] * pad
        batch = {"labels": torch.tensor([lab]), "position_ids": torch.tensor([pos])}
    rows, number, counts = segments(batch)
    flat = batch["labels"].reshape(-1).tolist()
    width = batch["labels"].shape[-1]
    want_rows = [t for t in range(len(flat) - 1) if (t + 1) % width != 0 and flat[t + 1] != -100]
    assert rows.tolist() == want_rows
    assert counts.tolist() == [sum(1 for v in labels if v != -100) for labels in label_lists]
    assert number.tolist() == [k for k, labels in enumerate(label_lists) for v in labels if v != -100]
