"""The training form <-> config mapping: every schema key round-trips, and errors land on their field."""

from __future__ import annotations

import dataclasses

import pytest
import yaml

from loratune.config import Config, _build, load_config, validate
from loratune.errors import ConfigError
from loratune.ui import form

BASES = [{"model": {"path": "demo://llama-test"}},
         {"model": {"path": "demo://llama-test"}, "data": {"eval_split": 0.1}},
         {"model": {"path": "demo://llama-test"}, "quantization": {"bits": 16}}]
YAML_CANDIDATES = ["[q_proj, v_proj]", "{enable_thinking: false}", "8", "4096", "auto", "'off'", "true",
                   "runs/old", '["Hello?"]', "[{path: data/a.jsonl, weight: 2.0}]", "0.2", "[lm_head]",
                   "{path: data/mmlu}", "[tensorboard]", "{type: linear, factor: 2.0}"]


def _config(data: dict) -> Config | None:
    try:
        cfg = _build(Config, data)
        validate(cfg)
        return cfg
    except ConfigError:
        return None


def _candidates(f: form.Field) -> list:
    if f.kind == "bool":
        return [not f.default]
    if f.kind == "choice":
        values = []
        for c in f.choices:
            _present, value = form.raw_value(f, c)
            values.append(value)
        return values
    if f.kind == "int":
        return [f.default + 1, f.default + 2, 1, 8, 100, 4096]
    if f.kind == "float":
        return [0.5, f.default * 2 + 0.25, 0.01, 2.0]
    if f.kind == "text":
        return ["demo://llama", "runs/x", "chatml", "main", "gaussian"]
    return [yaml.safe_load(c) for c in YAML_CANDIDATES]


def _set(base: dict, key: str, value) -> dict:
    data = yaml.safe_load(yaml.safe_dump(base))
    section, name = key.split(".", 1)
    data.setdefault(section, {})[name] = value
    return data


def test_every_key_is_a_field_with_its_default_and_help():
    keys = []
    for section in dataclasses.fields(Config):
        keys += [f"{section.name}.{f.name}" for f in dataclasses.fields(section.type if isinstance(section.type, type)
                                                                           else getattr(Config(), section.name))]
    assert [f.key for f in form.FIELDS] == keys
    for f in form.FIELDS:
        assert f.help, f.key
    assert form.BY_KEY["train.lr"].default == 2e-4 and form.BY_KEY["adapter.rank"].default == 64


def test_defaults_round_trip():
    cfg = load_config(None, ["model.path=demo://llama-test"])
    values = form.values_of(cfg)
    assert form.config_of(values) == cfg
    assert values["train.lr"] == 2e-4 and values["quantization.bits"] == "4" and values["model.kernels"] == "auto"


def test_every_key_round_trips_with_a_value_other_than_its_default():
    untested = []
    for f in form.FIELDS:
        tried = 0
        for base in BASES:
            for value in _candidates(f):
                cfg = _config(_set(base, f.key, value))
                section, name = f.key.split(".", 1)
                if cfg is None or getattr(getattr(cfg, section), name) == f.default:
                    continue
                values = form.values_of(cfg)
                back = form.config_of(values)
                assert back == cfg, f.key
                assert load_config_text(form.yaml_of(values)) == cfg, f.key  # the YAML shown is the same config
                tried += 1
        if not tried:
            untested.append(f.key)
    assert not untested, f"no non-default value could be tried for {untested}"


def load_config_text(text: str) -> Config:
    cfg = _build(Config, yaml.safe_load(text))
    validate(cfg)
    return cfg


def test_nullable_text_and_required_text():
    values = form.default_values()
    with pytest.raises(ConfigError, match="'model.path' is required"):
        form.config_of(values)
    values["model.path"] = "demo://llama-test"
    values["model.revision"] = ""
    assert form.config_of(values).model.revision is None
    values["model.revision"] = "v1"
    assert form.config_of(values).model.revision == "v1"


@pytest.mark.parametrize("key,shown,message", [
    ("train.lr", -1.0, "train.lr must be > 0, got -1.0"),
    ("adapter.rank", None, "config key 'adapter.rank': got None, expected an integer"),
    ("train.batch_size", "big", "config key 'train.batch_size': got 'big'"),
    ("data.datasets", "[{path: a.jsonl, wieght: 2}]",
     "unknown config key 'data.datasets.0.wieght': did you mean 'data.datasets.0.weight'?"),
    ("adapter.target_modules", "[q_proj", "config key 'adapter.target_modules': not valid YAML"),
])
def test_errors_are_the_cli_messages_and_name_their_field(key, shown, message):
    values = form.default_values()
    values["model.path"] = "demo://llama-test"
    values[key] = shown
    with pytest.raises(ConfigError) as e:
        form.config_of(values)
    assert message in str(e.value)
    assert form.field_of_error(str(e.value)) == key


def test_a_combination_error_names_the_first_key():
    values = form.default_values()
    values["model.path"] = "demo://llama-test"
    values["train.early_stopping_patience"] = 2
    with pytest.raises(ConfigError) as e:
        form.config_of(values)
    assert form.field_of_error(str(e.value)) == "train.early_stopping_patience"


def test_the_line_under_a_field_gives_help_and_default():
    assert form.info(form.BY_KEY["train.lr"]).endswith("(default: 0.0002)")
    assert form.info(form.BY_KEY["model.path"]).endswith("(default: required)")
    assert form.info(form.BY_KEY["adapter.target_modules"]).startswith(form.BY_KEY["adapter.target_modules"].help)
