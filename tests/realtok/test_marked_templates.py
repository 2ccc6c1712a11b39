"""The reference labels are right: hand-marked templates render like the real ones and supervise what we wrote.

Three independent things must agree before `expected_labels` can judge loratune's renderer: the real
template from the family's npm package, its hand-marked copy (marked/<family>.jinja), and the supervised
texts written by hand in conversations.py.
"""

from __future__ import annotations

import pytest
from conversations import EOT, FAMILIES, RAISES, RECORDS, Record
from npm_tokenizers import PACKAGES
from reference_labels import IGNORE, MARKED, expected_labels, marked_template, supervised_spans

CASES = [pytest.param(fam, rec, id=f"{fam}-{rec.name}") for fam in FAMILIES for rec in RECORDS]


def render_text(tok, rec: Record, template: str | None) -> str | BaseException:
    """The template's text for the conversation, or the exception it raises."""
    try:
        return tok.apply_chat_template(rec.messages, tools=rec.tools, chat_template=template, tokenize=False,
                                       **rec.kwargs)
    except Exception as e:  # noqa: BLE001 - what a real template raises on a conversation is part of the result
        return e


def test_every_family_with_a_template_has_a_marked_copy() -> None:
    with_template = {name for name, pkg in PACKAGES.items() if pkg.has_template}
    assert set(FAMILIES) == with_template == {p.stem for p in MARKED.glob("*.jinja")}
    assert all(set(rec.expected) == set(FAMILIES) for rec in RECORDS)


@pytest.mark.parametrize("family", FAMILIES)
def test_package_ships_the_template(real_tokenizer, family: str) -> None:
    tok = real_tokenizer(family)
    assert tok.chat_template and "{%" in tok.chat_template
    eot = tok.convert_tokens_to_ids(EOT[family])
    assert isinstance(eot, int) and eot != tok.unk_token_id  # the end-of-turn marker is one special token
    assert tok.convert_ids_to_tokens(eot) == EOT[family]


@pytest.mark.parametrize(("family", "rec"), CASES)
def test_marked_template_renders_the_original_text(real_tokenizer, family: str, rec: Record) -> None:
    tok = real_tokenizer(family)
    original = render_text(tok, rec, None)
    marked = render_text(tok, rec, marked_template(family))
    if isinstance(original, BaseException):
        assert isinstance(marked, type(original)), f"original raised {original!r}, marked gave {marked!r}"
        assert str(marked) == str(original)
    else:
        assert marked == original


@pytest.mark.parametrize(("family", "rec"), CASES)
def test_reference_labels_supervise_the_hand_written_text(real_tokenizer, family: str, rec: Record) -> None:
    tok = real_tokenizer(family)
    expected = rec.expected[family]
    if expected == RAISES:
        with pytest.raises(Exception):  # noqa: B017 - jinja's TemplateError or a TypeError, as the template raises
            expected_labels(tok, rec.messages, family, tools=rec.tools, **rec.kwargs)
        assert isinstance(render_text(tok, rec, None), BaseException)  # the real template refuses it too
        return
    ids, labels = expected_labels(tok, rec.messages, family, tools=rec.tools, **rec.kwargs)
    assert ids == tok.apply_chat_template(rec.messages, tools=rec.tools, tokenize=True, return_dict=False,
                                          **rec.kwargs)
    spans = supervised_spans(ids, labels)
    texts = [tok.decode(s, skip_special_tokens=False, clean_up_tokenization_spaces=False) for s in spans]
    assert texts == expected
    eot = tok.convert_tokens_to_ids(EOT[family])
    assert all(span[-1] == eot for span in spans)  # every assistant turn ends on its supervised end-of-turn
    assert labels[0] == IGNORE  # BOS / the first header is never supervised
