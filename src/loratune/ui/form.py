"""The training form, generated from the config schema: one field per key, and the mapping form <-> config.

Each key of `loratune.config.Config` (walked from the dataclasses, so a key added to the schema appears in
the form with no change here) becomes a `Field`: its dotted key, its help and default (the schema's
metadata, as docs/config.md shows them), and the kind of widget that edits it:

- `bool`       a checkbox;
- `choice`     a drop-down of the `Literal` values (`auto`/true/false for an `auto`-or-bool key);
- `int`/`float` a number box;
- `text`       a line of text (`str`, or `str | None` where empty means null);
- `yaml`       a YAML value, for lists, mappings and mixed types (datasets, target_modules, batch_size ...).

`values_of(cfg)` gives the widget values of a config and `config_of(values)` builds the config back through
the same `_build` + `validate` as `loratune train`, so a bad value is refused with the CLI's own message;
`ConfigError`s are attributed to the field whose key they name (`field_of_error`).
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from dataclasses import dataclass
from typing import Any, Literal, Union, get_args, get_origin

import yaml

from loratune.config import REQUIRED, Config, _build, _type_name, validate
from loratune.errors import ConfigError

Kind = Literal["bool", "choice", "int", "float", "text", "yaml"]
TRUE_FALSE = {"true": True, "false": False}


@dataclass(frozen=True)
class Field:
    key: str  # dotted: section.name
    kind: Kind
    default: Any  # the schema default (REQUIRED for a required key)
    help: str
    type_name: str  # what the CLI says is expected
    choices: tuple[str, ...] = ()
    nullable: bool = False  # `str | None`: an empty text box means null

    @property
    def section(self) -> str:
        return self.key.split(".", 1)[0]


DEFAULT_NOTES = {"en": ("(default: {})", "(default: required)"), "zh": ("（默认：{}）", "（必填）"),
                 "ru": ("(по умолчанию: {})", "(обязательный ключ)")}


def info(f: Field, lang: str = "en") -> str:
    """The line under a field: its help and its default, as docs/config.md gives them (the help in `lang`
    where `config_help_i18n` has it; the default value as YAML writes it)."""
    from loratune.ui.config_help_i18n import help_text

    default, required = DEFAULT_NOTES.get(lang, DEFAULT_NOTES["en"])
    note = required if f.default == REQUIRED else default.format(_dump(_plain(f.default)))
    return f"{help_text(f.key, f.help, lang)} {note}"


def _default(f: dataclasses.Field) -> Any:
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


def _kind(tp: Any) -> tuple[Kind, tuple[str, ...], bool]:
    origin, args = get_origin(tp), get_args(tp)
    if tp is bool:
        return "bool", (), False
    if tp is int:
        return "int", (), False
    if tp is float:
        return "float", (), False
    if tp is str:
        return "text", (), False
    if origin is Literal:
        return "choice", tuple(str(a) for a in args), False
    if origin in (Union, types.UnionType):
        rest = [a for a in args if a is not type(None)]
        if rest == [str]:
            return "text", (), True
        if len(rest) == 2 and get_origin(rest[0]) is Literal and rest[1] is bool:
            return "choice", (*(str(a) for a in get_args(rest[0])), "true", "false"), False
    return "yaml", (), False


def schema_fields(cls: type = Config, prefix: str = "") -> list[Field]:
    """Every key of the schema, in its order, with the widget that edits it."""
    out: list[Field] = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp, key = hints[f.name], f"{prefix}{f.name}"
        if dataclasses.is_dataclass(tp) and cls is Config:
            out += schema_fields(tp, key + ".")
            continue
        kind, choices, nullable = _kind(tp)
        out.append(Field(key, kind, _default(f), f.metadata.get("help", ""), _type_name(tp), choices, nullable))
    return out


FIELDS = schema_fields()
BY_KEY = {f.key: f for f in FIELDS}


def _dump(value: Any) -> str:
    return yaml.safe_dump(value, default_flow_style=True, allow_unicode=True, width=10_000).strip() \
        .removesuffix("...").strip()


def widget_value(f: Field, value: Any) -> Any:
    """What the widget of `f` shows for the config value `value`."""
    if value == REQUIRED:
        return "" if f.kind in ("text", "yaml") else None
    if f.kind == "bool":
        return bool(value)
    if f.kind == "choice":
        return str(value).lower() if isinstance(value, bool) else str(value)
    if f.kind in ("int", "float"):
        return value
    if f.kind == "text":
        return "" if value is None else str(value)
    return _dump(dataclasses.asdict(value) if dataclasses.is_dataclass(value) else _plain(value))


def _plain(value: Any) -> Any:
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if dataclasses.is_dataclass(value):
        return _plain(dataclasses.asdict(value))
    return value


def values_of(cfg: Config) -> dict[str, Any]:
    """The widget value of every field for `cfg`."""
    out = {}
    for f in FIELDS:
        section, name = f.key.split(".", 1)
        out[f.key] = widget_value(f, getattr(getattr(cfg, section), name))
    return out


def default_values() -> dict[str, Any]:
    return {f.key: widget_value(f, f.default) for f in FIELDS}


def raw_value(f: Field, shown: Any) -> tuple[bool, Any]:
    """(present, value) of the config key from its widget's value; absent keys take the schema default.

    YAML text that does not parse raises `ConfigError` naming the key, as a bad override would.
    """
    if f.kind == "bool":
        return True, bool(shown)
    if f.kind == "choice":
        if shown is None or shown == "":
            return False, None
        if shown in TRUE_FALSE and f.default not in TRUE_FALSE:
            return True, TRUE_FALSE[shown]
        ints = [a for a in get_args(_literal(f.key)) if isinstance(a, int) and not isinstance(a, bool)]
        return True, int(shown) if ints and str(shown).lstrip("-").isdigit() else shown
    if f.kind in ("int", "float"):
        if shown is None or shown == "":
            return True, None  # refused by _build: "got None, expected an integer"
        if f.kind == "int" and isinstance(shown, float) and shown.is_integer():
            return True, int(shown)
        return True, shown
    text = "" if shown is None else str(shown)
    if f.kind == "text":
        if not text.strip():
            return (True, None) if f.nullable else (f.default != REQUIRED, "")  # required: refused by _build
        return True, text
    if not text.strip():
        return False, None
    try:
        return True, yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"config key '{f.key}': not valid YAML: {e}".replace("\n", " ")) from None


def _literal(key: str) -> Any:
    section, name = key.split(".", 1)
    cls = typing.get_type_hints(Config)[section]
    return typing.get_type_hints(cls)[name]


def raw_config(values: dict[str, Any]) -> dict:
    """The YAML mapping the form describes (keys left empty are left out: the schema default applies)."""
    data: dict = {}
    for f in FIELDS:
        if f.key not in values:
            continue
        present, value = raw_value(f, values[f.key])
        if present:
            section, name = f.key.split(".", 1)
            data.setdefault(section, {})[name] = value
    return data


def config_of(values: dict[str, Any]) -> Config:
    """The validated config of the form, or `ConfigError` with the message `loratune train` would print."""
    cfg = _build(Config, raw_config(values))
    validate(cfg)
    return cfg


def yaml_of(values: dict[str, Any]) -> str:
    """The config file equivalent to the form: only the keys that differ from the defaults."""
    cfg = config_of(values)
    data: dict = {}
    for f in FIELDS:
        section, name = f.key.split(".", 1)
        value = getattr(getattr(cfg, section), name)
        if value != f.default or f.default == REQUIRED:
            data.setdefault(section, {})[name] = _plain(value)
    return yaml.safe_dump(data, sort_keys=False, allow_unicode=True)


KEY_IN_MESSAGE = re.compile(r"(?:key|override) '([A-Za-z0-9_.]+)'|\b((?:model|quantization|adapter|data|train|output)"
                            r"\.[A-Za-z0-9_.]+)")


def field_of_error(message: str) -> str | None:
    """The form field a `ConfigError` message is about: the first config key it names (a list item's key,
    e.g. data.datasets.0.path, belongs to its list's field)."""
    for m in KEY_IN_MESSAGE.finditer(message):
        key = (m.group(1) or m.group(2)).rstrip(".")
        parts = key.split(".")
        for n in range(len(parts), 1, -1):
            if ".".join(parts[:n]) in BY_KEY:
                return ".".join(parts[:n])
    return None
