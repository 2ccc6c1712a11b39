"""The eval config: strict loading with did-you-mean errors, overrides, and the impossible combinations."""

from __future__ import annotations

from pathlib import Path

import pytest

from loratune.errors import ConfigError
from loratune.eval.config import load_eval_config

BASE = """
models:
  - {name: base, path: demo://llama-test}
  - {name: tuned, path: runs/tuned}
mc:
  - {name: mmlu, path: data/mmlu, shots: 5}
"""


def _load(tmp_path: Path, text: str, *overrides: str):
    p = tmp_path / "eval.yaml"
    p.write_text(text, encoding="utf-8")
    return load_eval_config(p, list(overrides))


def test_loads_typed_sections_and_defaults(tmp_path: Path) -> None:
    cfg = _load(tmp_path, BASE)
    assert [m.name for m in cfg.models] == ["base", "tuned"]
    assert cfg.models[0].bits is None
    t = cfg.mc[0]
    assert (t.shots, t.style, t.split, t.dev_split, t.format) == (5, "letters", "test", "dev", "auto")
    assert t.columns.choices == "choices"
    assert cfg.judge.prompts is None and cfg.output.dir == "outputs/eval"


def test_overrides_reach_list_items(tmp_path: Path) -> None:
    cfg = _load(tmp_path, BASE, "mc.0.shots=0", "mc.0.style=cloze", "models.1.bits=4", "batch_size=2",
                "mc.0.columns.choices=[A, B, C, D]")
    assert (cfg.mc[0].shots, cfg.mc[0].style, cfg.models[1].bits, cfg.batch_size) == (0, "cloze", 4, 2)
    assert cfg.mc[0].columns.choices == ["A", "B", "C", "D"]


@pytest.mark.parametrize("override, message", [
    ("mc.0.shot=3", "unknown config key 'mc.0.shot': did you mean 'mc.0.shots'?"),
    ("mc.0.style=letter", "config key 'mc.0.style': got 'letter', expected one of 'letters', 'cloze' (did you mean 'letters'?)"),
    ("judge.modle=gpt", "unknown config key 'judge.modle': did you mean 'judge.model'?"),
    ("models.0.bits=3", "config key 'models.0.bits': got 3"),
    ("batch_size=0", "batch_size must be >= 1, got 0"),
    ("mc.0.shots=-1", "mc.0.shots must be >= 0, got -1"),
    ("models.1.name=base", "models: names must be unique, base repeats"),
    ("models.1.name=a/b", "models: name 'a/b' may hold only letters"),
    ("judge.prompts=p.jsonl", "judge.model is required with judge.prompts"),
    ("confidence=1.5", "confidence must be in (0, 1), got 1.5"),
])
def test_errors_name_the_key(tmp_path: Path, override: str, message: str) -> None:
    with pytest.raises(ConfigError) as e:
        _load(tmp_path, BASE, override)
    assert message in str(e.value)


def test_required_keys_and_empty_configs(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="config key 'mc.0.path' is required"):
        _load(tmp_path, "models: [{name: a, path: x}]\nmc: [{name: m}]\n")
    with pytest.raises(ConfigError, match="name at least one model"):
        _load(tmp_path, "mc: [{name: m, path: x}]\n")
    with pytest.raises(ConfigError, match="nothing to evaluate"):
        _load(tmp_path, "models: [{name: a, path: x}]\n")
    with pytest.raises(ConfigError, match="config file not found"):
        load_eval_config(tmp_path / "missing.yaml")


def test_judge_players_must_be_known_and_two(tmp_path: Path) -> None:
    text = BASE + "judge: {prompts: p.jsonl, model: judge-model, models: [base, other]}\n"
    with pytest.raises(ConfigError, match="judge.models: other not among the models"):
        _load(tmp_path, text)
    with pytest.raises(ConfigError, match="at least two models"):
        _load(tmp_path, BASE + "judge: {prompts: p.jsonl, model: m, models: [base]}\n")
    cfg = _load(tmp_path, BASE + "judge: {prompts: p.jsonl, model: m}\n")
    assert (cfg.judge.orderings, cfg.judge.elo_k, cfg.judge.elo_initial) == (10000, 32.0, 1000.0)


def test_eval_config_docs_do_not_drift() -> None:
    """docs/eval-config.md must be exactly what the eval schema generates (regenerate: loratune config-docs --eval
    --out docs/eval-config.md)."""
    from loratune.eval.config import reference_markdown

    doc = Path(__file__).parents[2] / "docs" / "eval-config.md"
    text = reference_markdown()
    assert doc.read_text(encoding="utf-8") == text + "\n"
    for key in ("## `mc[]`", "## `mc[].columns`", "## `judge`", "| `shots` |", "| `batch_size` |"):
        assert key in text
