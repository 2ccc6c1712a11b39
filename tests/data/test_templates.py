"""Template resolution: auto (own template, matched or with an inferred stop), fallback, files."""

from __future__ import annotations

import copy

import pytest

from loratune.data.render import IGNORE, render_conversation
from loratune.data.templates import TEMPLATES, resolve_template

# A Qwen2.5-style template: a default system prompt when there is none, "<|im_end|>\n" after each turn.
QWEN_LIKE = (
    "{% if messages[0]['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
CONV = [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "Bye?"}, {"role": "assistant", "content": "Bye."}]


@pytest.fixture
def qwen(toks: dict):
    tok, info = toks["qwen2"]
    return copy.deepcopy(tok), info


def test_auto_uses_own_template_with_inferred_stop(qwen) -> None:
    tok, info = qwen
    tok.chat_template = QWEN_LIKE
    t = resolve_template("auto", tok)
    assert (t.name, t.jinja, t.stop) == ("tokenizer", QWEN_LIKE, "{eos}")  # <|im_end|> is this tokenizer's eos
    ids, labels = render_conversation(CONV, t, tok, info)
    text = tok.decode(ids)
    assert text.startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n")
    sup = tok.decode([i for i, label in zip(ids, labels) if label != IGNORE])
    assert sup == "Hello.<|im_end|>Bye.<|im_end|>"


def test_auto_without_template_is_chatml_when_its_markers_are_tokens(qwen, caplog) -> None:
    tok, _ = qwen
    tok.chat_template = None
    with caplog.at_level("INFO", logger="loratune.data.templates"):
        assert resolve_template("auto", tok) == TEMPLATES["chatml"]
    assert [r.getMessage() for r in caplog.records] == [
        "the tokenizer has no chat template: using the built-in 'chatml' template (its <|im_start|>/<|im_end|> markers "
        "are tokens of this vocabulary); set data.template to choose another"]


def test_auto_without_template_never_splits_markers(toks: dict, caplog) -> None:
    """A base whose vocabulary lacks chatml's markers gets plain-text markers, never <|im_start|> in pieces."""
    tok, info = toks["llama"]
    tok = copy.deepcopy(tok)
    tok.chat_template = None
    assert len(tok.encode("<|im_start|>", add_special_tokens=False)) > 1  # chatml would be cut into pieces here
    with caplog.at_level("INFO", logger="loratune.data.templates"):
        t = resolve_template("auto", tok)
    assert t == TEMPLATES["guanaco"]
    assert "plain-text '### Human:'/'### Assistant:' markers" in caplog.records[0].getMessage()
    ids, labels = render_conversation(CONV, t, tok, info)
    sup = tok.decode([i for i, label in zip(ids, labels) if label != IGNORE])
    assert sup == " Hello.<|eot_id|> Bye.<|eot_id|>"  # each answer and the eos that closes it


def test_explicit_template_with_split_markers_is_allowed_with_a_warning(toks: dict, caplog) -> None:
    tok, _ = toks["llama"]
    with caplog.at_level("WARNING", logger="loratune.data.templates"):
        assert resolve_template("chatml", tok) == TEMPLATES["chatml"]
    assert "cuts its markers <|im_start|>, <|im_end|> into several tokens" in caplog.records[0].getMessage()


def test_template_file(tmp_path, qwen) -> None:
    tok, info = qwen
    path = tmp_path / "mine.jinja"
    path.write_text("{% for m in messages %}[{{ m['role'] }}]\n{{ m['content'] }}{% if m['role'] == 'assistant' %} <END>{% endif %}\n"
                    "{% endfor %}{% if add_generation_prompt %}[assistant]\n{% endif %}")
    t = resolve_template(str(path), tok)
    assert (t.name, t.stop) == ("mine", " <END>")  # no special token after the reply: the text up to the newline
    ids, labels = render_conversation(CONV, t, tok, info)
    sup = tok.decode([i for i, label in zip(ids, labels) if label != IGNORE])
    assert sup == "Hello. <END>Bye. <END>"


def test_builtin_by_name(qwen) -> None:
    tok, _ = qwen
    for name, t in TEMPLATES.items():
        assert resolve_template(name, tok) is t
