"""The Train form's config help in Chinese and Russian: every schema key has it, and it keeps the code."""

from __future__ import annotations

import dataclasses
import re
import typing

import pytest

from loratune.config import Config
from loratune.ui import form
from loratune.ui.config_help_i18n import HELP, SECTION_TITLES, help_text, section_title
from loratune.ui.context import Labels

LANGS = ("zh", "ru")
BACKTICKED = re.compile(r"`[^`]+`")


def schema_help() -> dict[str, str]:
    """Every key of the schema with its English help, walked from the config dataclasses as the form walks them."""
    out = {}
    for section in dataclasses.fields(Config):
        cls = typing.get_type_hints(Config)[section.name]
        for f in dataclasses.fields(cls):
            out[f"{section.name}.{f.name}"] = f.metadata.get("help", "")
    return out


def test_the_walk_covers_the_forms_fields():
    assert list(schema_help()) == [f.key for f in form.FIELDS]


@pytest.mark.parametrize("lang", LANGS)
def test_every_schema_key_has_a_help_text(lang: str):
    english = schema_help()
    missing = [k for k in english if not HELP[lang].get(k, "").strip()]
    assert not missing, f"config keys without a {lang} help in ui/config_help_i18n.py: {', '.join(missing)}"
    stale = sorted(set(HELP[lang]) - set(english))
    assert not stale, f"{lang} help for keys the schema does not have: {', '.join(stale)}"
    untranslated = [k for k in english if english[k] and HELP[lang][k] == english[k]]
    assert not untranslated, f"{lang} help identical to the English: {', '.join(untranslated)}"


@pytest.mark.parametrize("lang", LANGS)
def test_a_translation_keeps_every_backticked_token(lang: str):
    lost = {}
    for key, text in schema_help().items():
        missing = [tok for tok in BACKTICKED.findall(text) if tok not in HELP[lang].get(key, "")]
        if missing:
            lost[key] = missing
    assert not lost, f"{lang} help that lost backticked code: {lost}"


@pytest.mark.parametrize("lang", ("en", *LANGS))
def test_every_section_has_a_title_naming_it(lang: str):
    for section in (f.name for f in dataclasses.fields(Config)):
        title = SECTION_TITLES[lang].get(section, "")
        assert title.startswith(section), f"{lang} title of section {section!r}: {title!r}"


def test_the_form_shows_the_chosen_language():
    lr = form.BY_KEY["train.lr"]
    assert form.info(lr, "en") == f"{lr.help} (default: 0.0002)"
    assert form.info(lr, "zh") == f"{HELP['zh']['train.lr']} （默认：0.0002）"
    assert form.info(lr, "ru") == f"{HELP['ru']['train.lr']} (по умолчанию: 0.0002)"
    assert form.info(form.BY_KEY["model.path"], "ru").endswith("(обязательный ключ)")
    assert help_text("train.lr", lr.help, "fr") == lr.help  # a language without texts: the English help
    assert section_title("train", "zh") == SECTION_TITLES["zh"]["train"]


def test_switching_the_language_resends_help_and_titles():
    labels = Labels()
    field, accordion = object(), object()
    labels.add_text(field, lambda lang: form.info(form.BY_KEY["train.seed"], lang), "info")
    labels.add_text(accordion, lambda lang: section_title("train", lang))
    labels.add(object(), "train.launch", "value")
    zh = labels.updates("zh")
    assert zh[0]["info"].startswith(HELP["zh"]["train.seed"])
    assert zh[1]["label"] == SECTION_TITLES["zh"]["train"] and zh[2]["value"] == "开始训练"


def test_an_error_at_a_field_comes_back_after_the_language_switch(tmp_path):
    from loratune.ui.app import build_app
    from loratune.ui.paths import Workspace

    app = build_app(Workspace.at(tmp_path), "en")
    fns = list(app.fns.items())
    switch = next(i for i, d in fns
                  if any(getattr(app.blocks.get(t[0]), "elem_id", None) == "language" for t in d.targets))
    after = next(d for _, d in fns if d.trigger_after == switch)  # runs once the help texts were re-sent
    values = {**form.default_values(), "model.path": "demo://llama-test", "train.lr": -1}
    out = after.fn(*[values[f.key] for f in form.FIELDS], "zh", None)
    assert out[0] == "**⚠ train.lr must be > 0, got -1.0**" and out[4] == "train.lr"
    fields = dict(zip((f.key for f in form.FIELDS), out[5:]))
    assert fields["train.lr"]["info"] == "⚠ train.lr must be > 0, got -1.0"
    assert all("info" not in u for k, u in fields.items() if k != "train.lr")  # the others keep their new help
