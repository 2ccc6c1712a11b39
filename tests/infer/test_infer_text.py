"""Incremental detokenisation, stop-string hold-back and the sampling filters."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from loratune.infer.detok import IncrementalDetokenizer, StopStrings
from loratune.infer.sampling import (SamplingError, SamplingParams, apply_repetition_penalty, make_generator,
                                     next_tokens, top_k_filter, top_p_filter)
from loratune.model.tiny import build_tokenizer

TOK = build_tokenizer("llama", 512)


def stream(ids: list[int]) -> list[str]:
    d = IncrementalDetokenizer(lambda x: TOK.decode(x, skip_special_tokens=True))
    return [d.push(i) for i in ids] + [d.flush()]


@pytest.mark.parametrize("text", ["héllo wörld", "日本語のテキスト", "emoji 🙂🚀 mixed ✓ text", "plain ascii words"])
def test_streamed_pieces_concatenate_to_the_text_and_never_split_a_character(text: str) -> None:
    ids = TOK(text, add_special_tokens=False).input_ids
    assert len(ids) > len(text.split())  # multi-byte characters span several tokens here
    pieces = stream(ids)
    assert "".join(pieces) == text
    assert not any("\ufffd" in p for p in pieces)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(min_value=0, max_value=len(TOK) - 1), min_size=1, max_size=40))
def test_concatenation_equals_full_decode_for_any_ids(ids: list[int]) -> None:
    assert "".join(stream(ids)) == TOK.decode(ids, skip_special_tokens=True)


@settings(max_examples=100, deadline=None)
@given(st.text(alphabet="abcd", max_size=30), st.lists(st.text(alphabet="abcd", min_size=1, max_size=3),
                                                       min_size=1, max_size=3), st.integers(1, 4))
def test_stop_strings_cut_at_the_first_match_and_show_no_part_of_it(text: str, stops: list[str], chunk: int) -> None:
    s = StopStrings(stops)
    shown = "".join(s.feed(text[i:i + chunk]) for i in range(0, len(text), chunk)) + s.flush()
    # reference: the first prefix of the text that ends with a stop string (the longest such, on ties)
    ends = [(end, -len(x)) for end in range(len(text) + 1) for x in stops if text[:end].endswith(x)]
    if ends:
        end, neg = min(ends)
        assert shown == text[:end + neg] and s.hit is not None
    else:
        assert shown == text and s.hit is None


def test_stop_string_prefix_is_held_back_then_released() -> None:
    s = StopStrings(["</end>"])
    assert s.feed("hello </e") == "hello "
    assert s.feed("x") == "</ex"


def test_params_validation() -> None:
    for bad in (dict(temperature=-0.1), dict(temperature=2.5), dict(top_p=0.0), dict(top_p=1.1),
                dict(top_k=-1), dict(max_new_tokens=0), dict(repetition_penalty=0.0), dict(stop=("",))):
        with pytest.raises(SamplingError):
            SamplingParams(**bad).validate()


def test_top_k_and_top_p_filters() -> None:
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    assert torch.isinf(top_k_filter(logits, 2)).tolist() == [[False, False, True, True]]
    probs = logits.softmax(-1)[0]  # 0.644, 0.237, 0.087, 0.032
    assert torch.isinf(top_p_filter(logits, 0.5)).tolist() == [[False, True, True, True]]
    assert torch.isinf(top_p_filter(logits, float(probs[0] + 0.01))).tolist() == [[False, False, True, True]]
    assert torch.isinf(top_p_filter(logits, 0.999)).sum() == 0


def test_repetition_penalty_divides_positive_and_multiplies_negative_logits() -> None:
    logits = torch.tensor([[2.0, -2.0, 2.0]])
    seen = torch.tensor([[True, True, False]])
    assert apply_repetition_penalty(logits, seen, 2.0).tolist() == [[1.0, -4.0, 2.0]]


def test_sampling_frequencies_follow_the_tempered_softmax() -> None:
    logits = torch.tensor([1.0, 0.5, 0.0, -1.0]).repeat(20000, 1)
    params = SamplingParams(temperature=0.7)
    draws = next_tokens(logits, torch.zeros_like(logits, dtype=torch.bool), params, make_generator(0))
    freq = torch.bincount(draws, minlength=4).float() / len(draws)
    expected = (logits[0] / 0.7).softmax(-1)
    assert torch.allclose(freq, expected, atol=0.015)  # ~4 standard errors at n=20000


@settings(max_examples=200, deadline=None)
@given(temperature=st.floats(0.0, 2.0), top_p=st.floats(0.0, 1.0, exclude_min=True),
       top_k=st.integers(0, 10), penalty=st.floats(0.0, 10.0, exclude_min=True),
       scale=st.sampled_from([1e-30, 1.0, 30.0, 1e30]), seed=st.integers(0, 2**32))
def test_every_valid_setting_draws_a_token(temperature: float, top_p: float, top_k: int, penalty: float,
                                           scale: float, seed: int) -> None:
    """Settings in range but at the edge of floating point (temperature 1e-300, top_p 1e-320, a penalty of
    1e-300 dividing large logits) still give a token, never a NaN distribution (torch.multinomial's error)."""
    params = SamplingParams(temperature=temperature, top_p=top_p, top_k=top_k, repetition_penalty=penalty).validate()
    logits = torch.randn(3, 8, generator=torch.Generator().manual_seed(seed)) * scale
    seen = torch.zeros_like(logits, dtype=torch.bool)
    seen[:, ::2] = True
    draws = next_tokens(logits, seen, params, make_generator(seed))
    assert draws.shape == (3,) and bool(((draws >= 0) & (draws < 8)).all())


@pytest.mark.parametrize("temperature, top_p, penalty", [(1e-300, 1.0, 1.0), (5e-324, 1.0, 1.0), (1.0, 1e-320, 1.0),
                                                         (1.0, 1.0, 1e-300), (1e-300, 1e-320, 1e-300)])
def test_vanishing_temperature_top_p_or_penalty_is_the_greedy_choice(temperature: float, top_p: float,
                                                                     penalty: float) -> None:
    """Their limits are greedy: a temperature or top_p near 0 keeps only the likeliest token, and a penalty
    near 0 makes the likeliest seen token (positive logit / penalty) win."""
    logits = torch.tensor([[0.5, 2.0, 1.0, -3.0], [3.0, -1.0, 2.5, 0.0]])
    seen = torch.tensor([[True, False, True, False], [False, False, True, True]])
    params = SamplingParams(temperature=temperature, top_p=top_p, repetition_penalty=penalty)
    expected = apply_repetition_penalty(logits.double(), seen, penalty).argmax(-1)  # (1e-300 is 0 in float32)
    for seed in range(5):
        assert next_tokens(logits, seen, params, make_generator(seed)).tolist() == expected.tolist()
    if penalty < 1e-100:
        assert expected.tolist() == [2, 2]  # the largest seen positive logit now dominates
