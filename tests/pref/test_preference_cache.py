"""Preference data is cached as SFT data is: a second preparation of the same files, settings and tokenizer tokenizes
nothing and gives identical samples (KTO labels included); a changed file, column mapping, template or record kind
misses; a changed length limit reuses the entry (it is cached before length limits) and cuts as a fresh run does."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from loratune.config import load_config
from loratune.data import preference, preference_cache
from loratune.data.cache import folder
from loratune.data.preference import prepare_preference_data
from loratune.model.load import load_tokenizer

ROOT = Path(__file__).parents[2]
PAIRS, KTO = ROOT / "examples" / "data" / "preference.jsonl", ROOT / "examples" / "data" / "kto.jsonl"


@pytest.fixture
def fresh_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("LORATUNE_CACHE", str(tmp_path / "cache"))
    return tmp_path


@pytest.fixture
def renders(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts the sides rendered and tokenized (the real function runs)."""
    calls: list[int] = []
    real = preference._render

    def counted(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(preference, "_render", counted)
    return calls


def _prepare(tiny_llama: Path, data: Path, method: str = "dpo", *overrides: str):
    cfg = load_config(None, [f"model.path={tiny_llama}", f"data.datasets=[{{path: {data}}}]", f"train.method={method}",
                             "data.eval_split=0", *overrides])
    tok, info = load_tokenizer(cfg.model)
    return prepare_preference_data(cfg.data, tok, info, 0, method, log_stats=False)


def _fields(samples) -> list[tuple]:
    return [(s.input_ids, s.labels, s.position_ids, s.desirable) for s in samples]


def test_a_second_run_tokenizes_nothing_and_gives_the_same_samples(fresh_cache: Path, tiny_llama: Path,
                                                                   renders: list[int]) -> None:
    data = fresh_cache / "pairs.jsonl"
    data.write_text(PAIRS.read_text() + json.dumps({"prompt": "Same?", "chosen": "Yes.", "rejected": "Yes."}) + "\n")
    first = _prepare(tiny_llama, data)
    assert not first.stats.datasets[0].cached and len(renders) == 2 * 40  # two sides of the 40 distinct pairs
    assert first.stats.datasets[0].outcomes["identical"] == 1 and len(first.train) == 40
    assert [p.name for p in folder().iterdir()] == [next(folder().iterdir()).name] and \
        next(folder().iterdir()).name.startswith("pref-")
    second = _prepare(tiny_llama, data)
    assert second.stats.datasets[0].cached and len(renders) == 80  # nothing rendered again
    assert _fields(second.train) == _fields(first.train)
    assert second.stats.datasets[0].outcomes == first.stats.datasets[0].outcomes
    assert second.stats.datasets[0].records == 41
    # the other pair methods render pairs alike: the same entry
    assert _prepare(tiny_llama, data, "rm").stats.datasets[0].cached and len(renders) == 80
    # cached before length limits: a shorter max_length reuses it and cuts as an uncached run does
    short = _prepare(tiny_llama, data, "dpo", "data.max_length=48")
    assert short.stats.datasets[0].cached and len(renders) == 80
    uncached = _prepare(tiny_llama, data, "dpo", "data.max_length=48", "data.cache=false")
    assert len(renders) == 160 and not uncached.stats.datasets[0].cached
    assert _fields(short.train) == _fields(uncached.train) and _fields(short.train) != _fields(first.train)
    assert short.stats.datasets[0].outcomes == uncached.stats.datasets[0].outcomes


def test_a_changed_file_or_setting_misses(fresh_cache: Path, tiny_llama: Path, renders: list[int]) -> None:
    data = fresh_cache / "kto.jsonl"
    data.write_text(KTO.read_text())
    first = _prepare(tiny_llama, data, "kto")
    n = len(renders)
    assert _prepare(tiny_llama, data, "kto").stats.datasets[0].cached and len(renders) == n
    # a flipped KTO label changes the bytes: a miss, and the new label is what the sample carries
    rows = [json.loads(line) for line in data.read_text().splitlines()]
    rows[0]["label"] = not rows[0]["label"]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    flipped = _prepare(tiny_llama, data, "kto")
    assert not flipped.stats.datasets[0].cached and len(renders) == 2 * n
    assert [s.desirable for s in flipped.train] == [r["label"] for r in rows]
    assert [s.desirable for s in first.train][1:] == [r["label"] for r in rows][1:]
    assert _prepare(tiny_llama, data, "kto").stats.datasets[0].cached  # and then it hits
    # another template, another column mapping, fewer records: each a miss
    assert not _prepare(tiny_llama, data, "kto", "data.template=chatml").stats.datasets[0].cached
    renamed = fresh_cache / "renamed.jsonl"
    renamed.write_text(data.read_text().replace('"label"', '"ok"'))
    cfg = [f"data.datasets=[{{path: {renamed}, columns: {{label: ok}}}}]"]
    assert not _prepare(tiny_llama, renamed, "kto", *cfg).stats.datasets[0].cached
    assert _prepare(tiny_llama, renamed, "kto", *cfg).stats.datasets[0].cached
    few = [f"data.datasets=[{{path: {data}, max_samples: 6}}]"]
    assert not _prepare(tiny_llama, data, "kto", *few).stats.datasets[0].cached
    # the same bytes read as pairs would be another kind of record: never the KTO entry
    cfg = load_config(None, [f"model.path={tiny_llama}", f"data.datasets=[{{path: {data}}}]"])
    ds, tok = cfg.data.datasets[0], load_tokenizer(cfg.model)
    assert preference_cache.key([data], ds, "pairs", first.template, *tok) != \
        preference_cache.key([data], ds, "kto", first.template, *tok)
    assert not list(folder().glob("*.tmp*"))
