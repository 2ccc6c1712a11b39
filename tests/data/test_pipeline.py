"""prepare_data end to end: mixing, caps, eval split, length policies with counts, cache, parallelism, preview."""

from __future__ import annotations

import io

import pytest

from datahelp import CHAT, data_cfg
from loratune.config import Config, DataConfig, ModelConfig, validate
from loratune.data import cache, pipeline
from loratune.data.pipeline import prepare_data
from loratune.data.render import IGNORE
from loratune.data.stats import DataStats
from loratune.errors import ConfigError


def ids_of(samples) -> list[tuple[int, ...]]:
    return [tuple(s.input_ids) for s in samples]


def test_weights_and_caps(write, toks) -> None:
    tok, info = toks["qwen2"]
    a = write("a.jsonl", CHAT[:10])
    b = write("b.jsonl", CHAT[10:])
    cfg = data_cfg({"path": str(a), "weight": 2.0}, {"path": str(b), "weight": 0.5, "max_samples": 6})
    data = prepare_data(cfg, tok, info, seed=0)
    a_stats, b_stats = data.stats.datasets
    assert (a_stats.records, a_stats.mixed) == (10, 20)  # every sample twice
    assert (b_stats.records, b_stats.mixed) == (6, 3)  # the first 6 records, then a seeded half
    assert len(data.train) == 23
    again = prepare_data(cfg, tok, info, seed=0)
    assert ids_of(again.train) == ids_of(data.train)  # seeded: a rerun is identical
    other = prepare_data(cfg, tok, info, seed=1)
    assert sorted(ids_of(other.train)) != sorted(ids_of(data.train))


def test_max_samples_stops_reading(write, toks) -> None:
    """Records are streamed: rows past the cap are never read (so never validated)."""
    tok, info = toks["qwen2"]
    p = write("a.jsonl", CHAT[:3] + [{"broken": True}])
    data = prepare_data(data_cfg({"path": str(p), "max_samples": 3}), tok, info, seed=0)
    assert len(data.train) == 3


@pytest.mark.parametrize("split,n_eval", [(0.25, 5), (3, 3)])
def test_eval_split(write, toks, split: float, n_eval: int) -> None:
    tok, info = toks["qwen2"]
    cfg = data_cfg(write("a.jsonl", CHAT), eval_split=split)
    data = prepare_data(cfg, tok, info, seed=0)
    assert len(data.eval) == n_eval and len(data.train) == 20 - n_eval
    assert not set(ids_of(data.eval)) & set(ids_of(data.train))
    assert data.stats.datasets[0].eval == n_eval
    assert ids_of(prepare_data(cfg, tok, info, seed=0).eval) == ids_of(data.eval)
    assert all(s.position_ids is None for s in data.eval)


def test_eval_split_too_large(write, toks) -> None:
    from loratune.errors import DataError

    tok, info = toks["qwen2"]
    with pytest.raises(DataError, match="holds out 20 of the 20 usable records"):
        prepare_data(data_cfg(write("a.jsonl", CHAT), eval_split=20), tok, info, seed=0)


def test_eval_datasets(write, toks) -> None:
    from loratune.config import DatasetConfig

    tok, info = toks["qwen2"]
    cfg = data_cfg(write("a.jsonl", CHAT[:15]))
    cfg.eval_datasets = [DatasetConfig(path=str(write("e.jsonl", CHAT[15:])))]
    data = prepare_data(cfg, tok, info, seed=0)
    assert (len(data.train), len(data.eval)) == (15, 5)
    assert data.stats.eval_datasets[0].samples == 5


LONG = [{"messages": [{"role": "system", "content": "context " * 40}, {"role": "user", "content": "Question?"},
                      {"role": "assistant", "content": "answer " * 10}]}]


def lengths_of(write, toks, **kw):
    tok, info = toks["llama"]
    data = prepare_data(data_cfg(write("long.jsonl", LONG + CHAT[:2]), **kw), tok, info, seed=0)
    return tok, info, data


def test_truncation_prompt_first(write, toks) -> None:
    tok, info, data = lengths_of(write, toks, max_length=64, truncation="prompt_first")
    long = max(data.train, key=len)
    assert len(long) == 64 and long.input_ids[0] == info.bos_id
    assert tok.decode([i for i, label in zip(long.input_ids, long.labels) if label != IGNORE]) == "answer " * 10 + "<|eot_id|>"
    assert data.stats.truncated == 1 and data.stats.outcomes["ok"] == 2


def test_truncation_end(write, toks) -> None:
    _, info, data = lengths_of(write, toks, max_length=64, truncation="end")
    assert data.stats.truncated == 0 and data.stats.dropped == {"no_supervised": 1}  # the prompt alone fills 64
    _, _, data = lengths_of(write, toks, max_length=200, truncation="end")
    long = max(data.train, key=len)
    assert len(long) == 200 and data.stats.truncated == 1
    assert long.labels[-1] != IGNORE and long.input_ids[-1] != info.eos_id  # the end was cut


def test_truncation_drop(write, toks) -> None:
    _, _, data = lengths_of(write, toks, max_length=64, truncation="drop")
    assert data.stats.dropped == {"too_long": 1} and len(data.train) == 2


def test_source_target_lengths(write, toks) -> None:
    tok, info, data = lengths_of(write, toks, source_max_length=16, target_max_length=5)
    long = max(data.train, key=len)
    first = next(i for i, label in enumerate(long.labels) if label != IGNORE)
    assert first == 16 and len(long) == 21 and long.input_ids[0] == info.bos_id
    assert tok.decode(long.input_ids[1:16]).endswith("Question?<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n")


def test_no_supervised_dropped_and_counted(write, toks) -> None:
    tok, info = toks["qwen2"]
    rows = CHAT[:3] + [{"messages": [{"role": "user", "content": "Anyone?"}]}]
    data = prepare_data(data_cfg(write("a.jsonl", rows)), tok, info, seed=0)
    assert len(data.train) == 3 and data.stats.dropped == {"no_supervised": 1}
    assert all(any(x != IGNORE for x in s.labels[1:]) for s in data.train)


@pytest.mark.parametrize("lengths, median", [([4, 1, 3, 2], 2.5), ([3, 1, 2], 2), ([7, 7], 7), ([5], 5)])
def test_length_summary(lengths: list[int], median: float) -> None:
    summary = DataStats(lengths=lengths).length_summary()
    assert summary["median"] == median  # the mean of the two middle values for an even count
    assert summary["min"] == min(lengths) and summary["max"] == max(lengths)
    assert summary["mean"] == round(sum(lengths) / len(lengths), 1)


def test_packing(write, toks) -> None:
    tok, info = toks["qwen2"]
    data = prepare_data(data_cfg(write("a.jsonl", CHAT), pack=True, max_length=128), tok, info, seed=0)
    assert len(data.train) < 20 and all(len(r) <= 128 and r.position_ids is not None for r in data.train)
    assert sum(r.position_ids.count(0) for r in data.train) == 20
    assert 0.5 < data.stats.packing_efficiency <= 1.0
    assert data.stats.train_samples == 20 and data.stats.rows == len(data.train)


def test_cache_hit_and_invalidation(write, toks, monkeypatch) -> None:
    tok, info = toks["qwen2"]
    p = write("a.jsonl", CHAT)
    cfg = data_cfg(p, cache=True)
    first = prepare_data(cfg, tok, info, seed=0)
    assert not first.stats.datasets[0].cached
    calls = []
    monkeypatch.setattr(pipeline, "_tokenize_items", lambda *a: calls.append(1) or [])
    second = prepare_data(cfg, tok, info, seed=0)  # no tokenization at all
    assert second.stats.datasets[0].cached and not calls
    assert ids_of(second.train) == ids_of(first.train) and second.train[0].labels == first.train[0].labels
    assert second.stats.datasets[0].format == "messages"
    monkeypatch.undo()
    write("a.jsonl", CHAT[:5])  # the file changed: a new key
    assert len(prepare_data(cfg, tok, info, seed=0).train) == 5
    cfg.train_on = "all"  # the labels would change: a new key
    assert not prepare_data(cfg, tok, info, seed=0).stats.datasets[0].cached
    other_tok, other_info = toks["llama"]  # another tokenizer: a new key
    assert not prepare_data(cfg, other_tok, other_info, seed=0).stats.datasets[0].cached
    assert len(list(cache.folder().glob("*.npz"))) >= 4 and not list(cache.folder().glob("*.tmp*"))


def test_parallel_tokenization_matches_serial(write, toks, monkeypatch) -> None:
    tok, info = toks["qwen2"]
    rows = CHAT * 10
    serial = prepare_data(data_cfg(write("a.jsonl", rows), num_proc=1), tok, info, seed=0)
    monkeypatch.setattr(pipeline, "CHUNK", 50)  # several chunks, so the pool is used
    parallel = prepare_data(data_cfg(write("a.jsonl", rows), num_proc=2), tok, info, seed=0)
    assert ids_of(parallel.train) == ids_of(serial.train)
    assert [s.labels for s in parallel.train] == [s.labels for s in serial.train]


def test_error_names_the_row_across_chunks(write, toks, monkeypatch) -> None:
    from loratune.errors import DataError

    tok, info = toks["llama"]
    bad = {"messages": [{"role": "user", "content": "<|begin_of_text|>x"}, {"role": "assistant", "content": "y"}]}
    p = write("a.jsonl", CHAT * 5 + [bad])
    monkeypatch.setattr(pipeline, "CHUNK", 30)  # the bad row is found inside a later tokenizer batch
    with pytest.raises(DataError, match=f"{p}: row 101: the sequence holds 2 BOS"):
        prepare_data(data_cfg(p, num_proc=1), tok, info, seed=0)


def test_config_checks() -> None:
    def bad(**kw) -> str:
        cfg = Config(model=ModelConfig(path="x"), data=DataConfig(**kw))
        with pytest.raises(ConfigError) as e:
            validate(cfg)
        return str(e.value)

    from loratune.config import DatasetConfig

    assert "exclude each other" in bad(pack=True, group_by_length=True)
    assert "whole number" in bad(eval_split=2.5)
    assert "not both" in bad(eval_split=0.1, eval_datasets=[DatasetConfig(path="e.jsonl")])
    assert "data.datasets.0.weight must be > 0" in bad(datasets=[DatasetConfig(path="a", weight=0)])
    assert "data.datasets.0.max_samples" in bad(datasets=[DatasetConfig(path="a", max_samples=-1)])


def test_preview(write, toks, tiny_models) -> None:
    from loratune.data.preview import preview

    cfg = Config(model=ModelConfig(path=str(tiny_models["qwen2"])),
                 data=data_cfg(write("a.jsonl", CHAT), pack=True, max_length=128))
    out = io.StringIO()
    preview(cfg, n=2, stream=out)
    text = out.getvalue()
    assert "supervised text is between ⟦ and ⟧" in text and "\x1b[" not in text
    assert "⟦It is 0.<|im_end|>⟧" in text or "⟦It is" in text
    assert "⟪next sample⟫" in text and "packed row 1 of" in text
    for word in ("20 records -> 20 samples", "truncated: 0", "dropped: none", "supervised (", "packing efficiency",
                 "sample length: min", "length histogram"):
        assert word in text
    colour = io.StringIO()
    preview(cfg, n=1, color="always", stream=colour)
    assert "\x1b[32mIt is" in colour.getvalue()


def test_preview_prints_statistics_once(write, tiny_models, caplog) -> None:
    from loratune.data.preview import preview

    cfg = Config(model=ModelConfig(path=str(tiny_models["qwen2"])), data=data_cfg(write("a.jsonl", CHAT)))
    out = io.StringIO()
    with caplog.at_level("INFO", logger="loratune.data.pipeline"):
        preview(cfg, n=1, stream=out)
    assert out.getvalue().count("truncated: 0") == 1 and not caplog.records


def test_hub_dataset_through_datasets(toks, monkeypatch) -> None:
    """A name that is not a local path goes to `datasets.load_dataset` (split, streaming passed on), rows numbered."""
    import datasets

    calls = []

    def fake_load(name: str, split: str, streaming: bool):
        calls.append((name, split, streaming))
        return [{"instruction": "Q1", "output": "A1."}, {"instruction": "Q2"}]

    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    tok, info = toks["qwen2"]
    from loratune.errors import DataError

    with pytest.raises(DataError, match=r"^someone/set\[test\]: row 2: missing key 'output'"):
        prepare_data(data_cfg({"path": "someone/set", "split": "test"}, streaming=True), tok, info, seed=0)
    assert calls == [("someone/set", "test", True)]
    data = prepare_data(data_cfg({"path": "someone/set", "max_samples": 1}), tok, info, seed=0)
    assert len(data.train) == 1 and data.stats.datasets[0].records == 1
