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


def test_auto_without_template_is_chatml(qwen) -> None:
    tok, _ = qwen
    tok.chat_template = None
    assert resolve_template("auto", tok) == TEMPLATES["chatml"]


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
