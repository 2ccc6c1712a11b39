"""The causal-mask skip that keeps captured CUDA graphs on SDPA's causal kernels (loratune.kernels.causal_mask)."""

from __future__ import annotations

from pathlib import Path
from unittest import mock

import pytest
import torch
from transformers import AutoModelForCausalLM
from transformers.masking_utils import sdpa_mask, sliding_window_causal_mask_function

from loratune.kernels.causal_mask import (
    NAME,
    NAME_UNPADDED,
    causal_mask_for,
    causal_mask_skip,
    causal_skip_mask,
    is_unpadded,
    unpadded_causal_mask,
)


def test_no_padding_means_no_mask() -> None:
    assert causal_skip_mask(2, 16, 16) is None
    assert causal_skip_mask(2, 1, 16, q_offset=15) is None  # one decoding query


@pytest.mark.parametrize("case", ["padding", "no_skip", "window", "offset"])
def test_otherwise_the_mask_is_transformers_own(case: str) -> None:
    kw: dict = {}
    q, kv = 8, 8
    if case == "padding":
        kw["attention_mask"] = torch.tensor([[1] * 8, [0, 0] + [1] * 6], dtype=torch.bool)
    elif case == "no_skip":  # what create_causal_mask passes for packed sequences
        kw["allow_is_causal_skip"] = False
    elif case == "window":  # a sliding window narrower than the keys changes the mask
        kw["local_size"], kw["mask_function"] = 4, sliding_window_causal_mask_function(4)
    else:  # queries after a cache of 3 tokens, keys longer than queries
        q, kv, kw["q_offset"] = 5, 8, 3
    ours = causal_skip_mask(2, q, kv, **kw)
    ref = sdpa_mask(2, q, kv, **kw)
    assert ours is not None and ref is not None
    assert torch.equal(ours, ref)
    if case == "window":  # a row far from the start sees only its window: 4 keys
        assert ours[0, 0, 7].sum().item() == 4


def test_window_wider_than_keys_is_plain_causal() -> None:
    assert causal_skip_mask(1, 8, 8, local_size=4096, mask_function=sliding_window_causal_mask_function(4096)) is None


def _sdpa_model(path: Path) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(path, attn_implementation="sdpa", dtype=torch.float32).eval()


def test_context_switches_and_restores_and_logits_are_unchanged(tiny_llama: Path) -> None:
    model = _sdpa_model(tiny_llama)
    ids = torch.randint(3, model.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    pad = torch.ones_like(ids)
    pad[1, :4] = 0
    with torch.no_grad():
        ref = model(input_ids=ids).logits
        ref_pad = model(input_ids=ids, attention_mask=pad).logits
        with causal_mask_skip(model) as n:
            assert n >= 1
            assert model.config._attn_implementation == NAME
            got = model(input_ids=ids).logits
            got_pad = model(input_ids=ids, attention_mask=pad).logits
    assert model.config._attn_implementation == "sdpa"
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-6)
    torch.testing.assert_close(got_pad[:, 4:], ref_pad[:, 4:], rtol=0, atol=1e-6)
    # the padded row really is masked differently from the unpadded one (the mask was honoured)
    assert (got_pad[1, 4:] - got[1, 4:]).abs().max() > 1e-3


def test_context_restores_after_an_error(tiny_llama: Path) -> None:
    model = _sdpa_model(tiny_llama)
    with pytest.raises(RuntimeError), causal_mask_skip(model):
        raise RuntimeError("boom")
    assert model.config._attn_implementation == "sdpa"


def test_context_leaves_other_attention_alone(tiny_llama: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(tiny_llama, attn_implementation="eager")
    with causal_mask_skip(model) as n:
        assert n == 0 and model.config._attn_implementation == "eager"


def test_unpadded_builder_ignores_an_all_ones_mask() -> None:
    ones = torch.ones(2, 8, dtype=torch.bool)
    assert unpadded_causal_mask(2, 8, 8, attention_mask=ones) is None
    # what it cannot skip (a narrow window) is built as for no padding at all
    fn = sliding_window_causal_mask_function(4)
    torch.testing.assert_close(unpadded_causal_mask(2, 8, 8, mask_function=fn, attention_mask=ones, local_size=4),
                               sdpa_mask(2, 8, 8, mask_function=fn, local_size=4))


def test_is_unpadded() -> None:
    ids = torch.arange(6).reshape(2, 3)
    assert is_unpadded({"input_ids": ids, "attention_mask": torch.ones_like(ids)})
    assert not is_unpadded({"input_ids": ids, "attention_mask": torch.tensor([[1, 1, 1], [0, 1, 1]])})
    assert not is_unpadded({"input_ids": ids})  # no mask: transformers' own checks decide
    assert not is_unpadded({"input_ids": ids, "position_ids": ids, "attention_mask": torch.ones_like(ids)})


def test_causal_mask_for_switches_only_for_unpadded_batches(tiny_llama: Path) -> None:
    model = _sdpa_model(tiny_llama)
    ids = torch.arange(6).reshape(2, 3)
    with causal_mask_for(model, {"input_ids": ids, "attention_mask": torch.ones_like(ids)}):
        assert model.config._attn_implementation == NAME_UNPADDED
    with causal_mask_for(model, {"input_ids": ids, "attention_mask": torch.tensor([[1, 1, 1], [0, 1, 1]])}):
        assert model.config._attn_implementation == "sdpa"
    assert model.config._attn_implementation == "sdpa"


def _masks_seen(model: torch.nn.Module, **inputs) -> list:
    seen: list = []
    hooks = [m.register_forward_pre_hook(lambda mod, a, kw: seen.append(kw.get("attention_mask")), with_kwargs=True)
             for name, m in model.named_modules() if name.endswith("self_attn")]
    try:
        with torch.no_grad():
            model(**inputs)
    finally:
        for h in hooks:
            h.remove()
    return seen


def test_under_capture_the_mask_stays_off(tiny_llama: Path) -> None:
    """A CUDA stream capture as transformers sees it (its `is_tracing` answers True; simulated on CPU): by itself
    it builds an explicit mask for an unpadded batch with an all-ones mask (5.17 does so without one too); inside
    `causal_mask_skip(unpadded=True)` the attention layers get none, and the logits are the same."""
    model = _sdpa_model(tiny_llama)
    ids = torch.randint(3, model.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(1))
    ones = torch.ones_like(ids)
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=ones).logits
    with mock.patch("transformers.masking_utils.is_tracing", return_value=True):
        assert all(m is not None for m in _masks_seen(model, input_ids=ids, attention_mask=ones))
        with causal_mask_skip(model, unpadded=True):
            seen = _masks_seen(model, input_ids=ids, attention_mask=ones)
            with torch.no_grad():
                got = model(input_ids=ids, attention_mask=ones).logits
    assert seen and all(m is None for m in seen)
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-6)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_captured_forward_gets_no_mask(tiny_llama: Path) -> None:
    """Under a real CUDA graph capture the attention layers receive no mask inside the context."""
    model = AutoModelForCausalLM.from_pretrained(tiny_llama, attn_implementation="sdpa", dtype=torch.bfloat16,
                                                 device_map="cuda").eval()
    seen: list = []
    hooks = [m.register_forward_pre_hook(lambda mod, a, kw: seen.append(kw.get("attention_mask")), with_kwargs=True)
             for name, m in model.named_modules() if name.endswith("self_attn")]
    ids = torch.randint(3, model.config.vocab_size, (2, 64), device="cuda")
    with torch.no_grad():
        ones = torch.ones_like(ids)
        eager = model(input_ids=ids, attention_mask=ones).logits.float()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with causal_mask_skip(model, unpadded=True):
            with torch.cuda.stream(side):
                model(input_ids=ids, attention_mask=ones)
            torch.cuda.current_stream().wait_stream(side)
            seen.clear()
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                out = model(input_ids=ids, attention_mask=ones).logits
        g.replay()
        torch.cuda.synchronize()
    for h in hooks:
        h.remove()
    assert seen and all(m is None for m in seen)
    torch.testing.assert_close(out.float(), eager, rtol=0, atol=0)
