"""Perplexity: windows, the rolling log-likelihood against lm-evaluation-harness, and the summary formulas."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from loratune.errors import DataError
from loratune.eval.perplexity import document_nll, prefix_token, read_documents, summarize, windows

TEXTS = ["The cat sat on the mat and looked at the garden for a long while.",
         "Short one.",
         "QLoRA fine-tunes a quantized base with low-rank adapters; the base stays frozen in four bits."]


def test_windows_cover_every_token_once() -> None:
    assert windows(0, 8, 8) == []
    assert windows(5, 8, 8) == [(0, 5, 5)]
    # 20 tokens, windows of 8: predict 1-8, then 9-16 from inputs 8-15, then 17-20 from inputs 12-19
    assert windows(20, 8, 8) == [(0, 8, 8), (8, 16, 8), (12, 20, 4)]
    # stride 4: each later window scores 4 new tokens with up to 8 inputs
    assert windows(12, 8, 4) == [(0, 8, 8), (4, 12, 4)]
    for n, length, stride in [(37, 8, 8), (37, 8, 3), (9, 8, 1)]:
        assert sum(t for _, _, t in windows(n, length, stride)) == n
        assert all(0 < end - start <= length for start, end, _ in windows(n, length, stride))


@torch.no_grad()
def _reference_nll(model, ids: list[int], prefix: int) -> float:
    """The whole document in one forward: the exact value when it fits one window."""
    seq = torch.tensor([[prefix, *ids]])
    lp = torch.log_softmax(model(seq[:, :-1]).logits[0].float(), dim=-1)
    return -float(lp.gather(1, seq[0, 1:].unsqueeze(1)).sum())


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_one_window_equals_the_plain_forward_and_batching_changes_nothing(family: str, tiny_models: dict[str, Path]) -> None:
    model = AutoModelForCausalLM.from_pretrained(tiny_models[family], dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(tiny_models[family])
    ids = [tok(t, add_special_tokens=False).input_ids for t in TEXTS]
    prefix = prefix_token(tok)
    assert prefix == (tok.bos_token_id if family == "llama" else tok.eos_token_id)
    exact = [_reference_nll(model, x, prefix) for x in ids]
    assert document_nll(model, ids, prefix, max_length=512, stride=512, batch_size=2) == pytest.approx(exact, abs=1e-4)
    short = document_nll(model, ids, prefix, max_length=8, stride=8, batch_size=3)  # less context, other values
    assert short != pytest.approx(exact, abs=1e-3)
    assert document_nll(model, ids, prefix, max_length=8, stride=8, batch_size=1) == pytest.approx(short, abs=1e-4)


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma"])
def test_windows_on_the_decoder_equal_transformers(family: str, tiny_models: dict[str, Path]) -> None:
    """loratune's decoder over the same tensors, windows in padding-free streams: the same NLLs."""
    from loratune.decoder import decoder_from_hf

    model = AutoModelForCausalLM.from_pretrained(tiny_models[family], dtype=torch.float32).eval()
    ref_model = AutoModelForCausalLM.from_pretrained(tiny_models[family], dtype=torch.float32).eval()
    decoder = decoder_from_hf(model, attention="sdpa").eval()
    tok = AutoTokenizer.from_pretrained(tiny_models[family])
    ids = [tok(t, add_special_tokens=False).input_ids for t in TEXTS]
    prefix = prefix_token(tok)
    for max_length, stride, batch_size in ((512, 512, 2), (8, 8, 3), (8, 3, 4)):
        ours = document_nll(decoder, ids, prefix, max_length=max_length, stride=stride, batch_size=batch_size)
        ref = document_nll(ref_model, ids, prefix, max_length=max_length, stride=stride, batch_size=batch_size)
        assert ours == pytest.approx(ref, abs=1e-4)


def test_rolling_windows_equal_lm_eval(tiny_models: dict[str, Path]) -> None:
    lm_eval = pytest.importorskip("lm_eval")  # noqa: F841
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    folder = tiny_models["llama"]
    lm = HFLM(pretrained=str(folder), batch_size=2, device="cpu", dtype="float32", max_length=8, add_bos_token=False)
    reference = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (t,), i) for i, t in enumerate(TEXTS)],
                                         disable_tqdm=True)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(folder)
    ids = [tok(t, add_special_tokens=False).input_ids for t in TEXTS]
    assert max(len(x) for x in ids) > 16  # several windows
    ours = document_nll(model, ids, prefix_token(tok), max_length=8, stride=8, batch_size=2)
    assert [-x for x in ours] == pytest.approx(reference, abs=1e-4)


def test_summary_formulas() -> None:
    records = [{"nll": 10.0, "tokens": 5, "bytes": 20, "words": 4}, {"nll": 6.0, "tokens": 3, "bytes": 12, "words": 2}]
    s = summarize(records, resamples=100, confidence=0.95, seed=0)
    m = s["metrics"]
    assert m["perplexity"]["value"] == pytest.approx(math.exp(16 / 8))
    assert m["bits_per_byte"]["value"] == pytest.approx(16 / 32 / math.log(2))
    assert m["word_perplexity"]["value"] == pytest.approx(math.exp(16 / 6))
    assert (s["n"], s["tokens"], s["bytes"]) == (2, 8, 32)
    assert m["perplexity"]["n"] == 2 and m["perplexity"]["ci"][0] <= m["perplexity"]["value"]


def test_reading_documents(tmp_path: Path) -> None:
    txt = tmp_path / "held.txt"
    txt.write_text("First paragraph\nstill first.\n\nSecond one.\n")
    docs, files = read_documents(str(txt), text_key="text")
    assert [d.text for d in docs] == ["First paragraph\nstill first.", "Second one."] and files == [txt]
    assert docs[1].row == 4
    js = tmp_path / "held.jsonl"
    js.write_text('{"body": "x"}\n')
    with pytest.raises(DataError, match=r"held.jsonl: row 1: missing key 'text' \(the text; set text_key\); the record has: body"):
        read_documents(str(js), text_key="text")
    assert read_documents(str(js), text_key="body")[0][0].text == "x"
