"""Preference data: every accepted record shape gives the same tokens, labels cover the completion only (its end of
turn included), bad records fail naming file, row and key, KTO pairs each completion with the previous record's,
and `loratune data preview` shows the two sides of a pair side by side."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from loratune.config import load_config
from loratune.data.preference import PreferenceSample, prepare_preference_data
from loratune.data.preview import format_preview
from loratune.errors import DataError
from loratune.model.load import load_tokenizer

Q, GOOD, BAD = "What is the capital of France?", "Paris is the capital.", "I do not know."
SHAPES = {
    "texts": {"prompt": Q, "chosen": GOOD, "rejected": BAD},
    "ultrafeedback": {"prompt": Q, "chosen": [{"role": "user", "content": Q}, {"role": "assistant", "content": GOOD}],
                      "rejected": [{"role": "user", "content": Q}, {"role": "assistant", "content": BAD}]},
    "hh": {"chosen": f"\n\nHuman: {Q}\n\nAssistant: {GOOD}", "rejected": f"\n\nHuman: {Q}\n\nAssistant: {BAD}"},
    "conversations": {"chosen": [{"role": "user", "content": Q}, {"role": "assistant", "content": GOOD}],
                      "rejected": [{"role": "user", "content": Q}, {"role": "assistant", "content": BAD}]},
    "prompt messages": {"prompt": [{"role": "user", "content": Q}], "chosen": [{"role": "assistant", "content": GOOD}],
                        "rejected": [{"role": "assistant", "content": BAD}]},
    "sharegpt keys": {"prompt": [{"from": "human", "value": Q}], "chosen": [{"from": "gpt", "value": GOOD}],
                      "rejected": [{"from": "gpt", "value": BAD}]},
}


@pytest.fixture(scope="module")
def tok(tiny_llama: Path):
    cfg = load_config(None, [f"model.path={tiny_llama}"])
    return load_tokenizer(cfg.model)


def _prepare(tmp_path: Path, tiny_llama: Path, tok, records: list[dict], method: str = "dpo", *overrides: str):
    f = tmp_path / "prefs.jsonl"
    f.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    cfg = load_config(None, [f"model.path={tiny_llama}", f"data.datasets=[{{path: {f}}}]", f"train.method={method}",
                             *overrides])
    return prepare_preference_data(cfg.data, *tok, 0, method, log_stats=False), f


def _sides(sample: PreferenceSample):
    cut = sample.position_ids.index(0, 1)
    return (sample.input_ids[:cut], sample.labels[:cut]), (sample.input_ids[cut:], sample.labels[cut:])


def _supervised_text(tokenizer, ids, labels) -> str:
    return tokenizer.decode([i for i, lab in zip(ids, labels) if lab != -100])


def test_every_shape_gives_the_same_pair(tmp_path: Path, tiny_llama: Path, tok) -> None:
    samples = {}
    for name, rec in SHAPES.items():
        data, _ = _prepare(tmp_path, tiny_llama, tok, [rec])
        (sample,) = data.train
        samples[name] = sample
    first = samples["texts"]
    for name, s in samples.items():
        assert (s.input_ids, s.labels, s.position_ids) == (first.input_ids, first.labels, first.position_ids), name
    (c_ids, c_labels), (r_ids, r_labels) = _sides(first)
    tokenizer = tok[0]
    assert _supervised_text(tokenizer, c_ids, c_labels) == GOOD + "<|eot_id|>"
    assert _supervised_text(tokenizer, r_ids, r_labels) == BAD + "<|eot_id|>"
    assert tokenizer.decode(c_ids).count(Q) == 1 and c_ids[0] == r_ids[0] == tok[1].bos_id
    # the prompt's tokens are the same on both sides, and unsupervised
    n = next(i for i, lab in enumerate(c_labels) if lab != -100)
    assert c_ids[:n] == r_ids[:n] and all(lab == -100 for lab in r_labels[:n])


def test_multi_turn_prompt_trains_only_the_last_answer(tmp_path: Path, tiny_llama: Path, tok) -> None:
    rec = {"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                      {"role": "assistant", "content": "Hello there"}, {"role": "user", "content": Q}],
           "chosen": GOOD, "rejected": BAD}
    data, _ = _prepare(tmp_path, tiny_llama, tok, [rec])
    (c_ids, c_labels), (r_ids, _) = _sides(data.train[0])
    assert _supervised_text(tok[0], c_ids, c_labels) == GOOD + "<|eot_id|>"
    assert "Hello there" in tok[0].decode(c_ids) and "Be brief." in tok[0].decode(r_ids)


def test_column_mapping(tmp_path: Path, tiny_llama: Path, tok) -> None:
    rec = {"question": Q, "good": GOOD, "bad": BAD}
    data, _ = _prepare(tmp_path, tiny_llama, tok, [rec], "dpo",
                       "data.datasets.0.columns={prompt: question, chosen: good, rejected: bad}")
    want, _ = _prepare(tmp_path, tiny_llama, tok, [SHAPES["texts"]])
    assert data.train[0].input_ids == want.train[0].input_ids


@pytest.mark.parametrize(("record", "key", "words"), [
    ({"prompt": Q, "chosen": GOOD}, None, "missing key 'rejected'"),
    ({"prompt": Q, "chosen": GOOD, "rejected": 3}, "rejected", "expected"),
    ({"prompt": Q, "chosen": [{"role": "assistant", "content": GOOD}, {"role": "user", "content": "and?"}],
      "rejected": BAD}, "chosen", "exactly one assistant message"),
    ({"chosen": GOOD, "rejected": BAD}, "chosen", "no prompt"),
    ({"chosen": f"\n\nHuman: {Q}\n\nAssistant:", "rejected": BAD}, "chosen", "turn 1 (Assistant:) is empty"),
    ({"prompt": Q, "chosen": [{"role": "robot", "content": GOOD}], "rejected": BAD}, "chosen[0].role", "unknown role"),
])
def test_bad_records_name_file_row_and_key(tmp_path: Path, tiny_llama: Path, tok, record, key, words) -> None:
    with pytest.raises(DataError) as e:
        _prepare(tmp_path, tiny_llama, tok, [SHAPES["texts"], record])
    message = str(e.value)
    assert "prefs.jsonl: row 2:" in message and words in message
    if key is not None:
        assert f"key '{key}'" in message


def test_kto_pairs_each_completion_with_the_previous_records(tmp_path: Path, tiny_llama: Path, tok) -> None:
    recs = [{"prompt": f"Question {i}?", "completion": f"Answer number {i}.", "label": i % 2 == 0} for i in range(3)]
    data, _ = _prepare(tmp_path, tiny_llama, tok, recs, "kto")
    tokenizer = tok[0]
    for i, s in enumerate(data.train):
        (ids, labels), (kl_ids, kl_labels) = _sides(s)
        assert s.desirable == (i % 2 == 0)
        assert _supervised_text(tokenizer, ids, labels) == f"Answer number {i}.<|eot_id|>"
        assert _supervised_text(tokenizer, kl_ids, kl_labels) == f"Answer number {(i - 1) % 3}.<|eot_id|>"
        assert f"Question {i}?" in tokenizer.decode(kl_ids)
    with pytest.raises(DataError, match="row 1: key 'label': expected true"):
        _prepare(tmp_path, tiny_llama, tok, [{"prompt": Q, "completion": GOOD, "label": "yes"}], "kto")


def test_a_pair_is_dropped_whole_and_counted(tmp_path: Path, tiny_llama: Path, tok) -> None:
    long = {"prompt": Q, "chosen": GOOD, "rejected": "very long answer " * 40}
    data, _ = _prepare(tmp_path, tiny_llama, tok, [SHAPES["texts"], long], "dpo", "data.max_length=64",
                       "data.truncation=drop")
    assert len(data.train) == 1 and data.stats.outcomes["too_long"] == 1 and data.stats.outcomes["ok"] == 1


def test_preview_shows_chosen_and_rejected_side_by_side(tmp_path: Path, tiny_llama: Path, tok) -> None:
    data, _ = _prepare(tmp_path, tiny_llama, tok, [SHAPES["texts"]])
    text = format_preview(data, tok[0], 1, color=False)
    header = next(line for line in text.splitlines() if line.startswith("chosen"))
    assert header.split("│")[1].strip() == "rejected"
    rows = [line for line in text.splitlines() if "│" in line]
    assert any("⟦Paris is the capital." in r.split("│")[0] and "⟦I do not know." in r.split("│")[1] for r in rows)


def test_a_pair_with_the_same_two_answers_is_dropped_and_reported(tmp_path: Path, tiny_llama: Path, tok,
                                                                   caplog) -> None:
    same = [{"prompt": Q, "chosen": GOOD, "rejected": GOOD},
            {"chosen": f"\n\nHuman: {Q}\n\nAssistant: {GOOD}", "rejected": f"\n\nHuman: {Q}\n\nAssistant: {GOOD}"}]
    with caplog.at_level("WARNING"):
        data, _ = _prepare(tmp_path, tiny_llama, tok, [SHAPES["texts"], *same])
    assert len(data.train) == 1 and data.stats.outcomes["identical"] == 2
    assert "2 pairs dropped: their chosen and rejected answers are the same (first: " in caplog.text
    assert "prefs.jsonl: row 2)" in caplog.text
