"""loratune's renderer on real tokenizers and their real chat templates gives the reference labels.

For every family with a real template and every conversation of conversations.py, the conversation goes
through the same path training data takes (the `messages` format normaliser, `load_tokenizer`,
`resolve_template("auto")`, `render_conversation`), and the ids and labels must equal the independent
reference: the hand-marked copy of the real template rendered by transformers with its assistant mask
(reference_labels.expected_labels), itself checked against hand-written texts in test_marked_templates.py.
The renderer is run twice: on the real template (no markers: labels found by comparing renderings) and on
the marked copy (the template's own `{% generation %}` markers), and both must agree with the reference.
"""

from __future__ import annotations

from functools import cache

import pytest
from conversations import FAMILIES, RECORDS, Record
from reference_labels import IGNORE, expected_labels, marked_template, supervised_spans

from loratune.config import ModelConfig
from loratune.data.formats import Normaliser
from loratune.data.readers import Record as RawRecord
from loratune.data.render import RenderError, render_conversation
from loratune.data.templates import ChatTemplate, resolve_template
from loratune.errors import DataError
from loratune.model.load import load_tokenizer

CASES = [pytest.param(fam, rec, id=f"{fam}-{rec.name}") for fam in FAMILIES for rec in RECORDS]


@cache
def _loaded(folder: str):
    return load_tokenizer(ModelConfig(path=folder))


def _normalised(rec: Record) -> tuple[list[dict], list | None]:
    """The record as training data reaches the renderer; an empty assistant turn, which the data reader refuses
    as a likely mistake, is rendered as written (the renderer must still label it right)."""
    data = {"messages": rec.messages, **({"tools": rec.tools} if rec.tools else {})}
    try:
        ex = Normaliser("messages", None, None)(RawRecord("conversations.py", 1, data))
    except DataError as e:
        assert "empty assistant turn" in str(e)
        return rec.messages, rec.tools
    for raw, kept in zip(rec.messages, ex.messages, strict=True):  # nothing the record says is lost on the way
        assert {k for k, v in raw.items() if v is not None} <= set(kept)
    return ex.messages, ex.tools


def _runs(tok, ids: list[int], labels: list[int]) -> list[str]:
    return [tok.decode(r, skip_special_tokens=False) for r in supervised_spans(ids, labels)]


def _reference(tok, messages: list[dict], family: str, tools: list | None, kwargs: dict):
    try:
        return expected_labels(tok, messages, family, tools=tools, **kwargs)
    except Exception:  # noqa: BLE001 - the real template refuses the conversation
        return None


@pytest.mark.parametrize(("family", "rec"), CASES)
def test_labels_equal_the_marked_reference(tokenizer_dir, family: str, rec: Record) -> None:
    tok, info = _loaded(str(tokenizer_dir(family)))
    messages, tools = _normalised(rec)
    template = resolve_template("auto", tok, rec.kwargs)
    assert template.name == "tokenizer" and template.jinja == tok.chat_template
    reference = _reference(tok, messages, family, tools, rec.kwargs)
    marked = ChatTemplate("marked", marked_template(family), template.stop, dict(rec.kwargs))
    text = None if reference is None else tok.decode(reference[0])
    dropped = text is not None and any(
        name not in text for name in [*(c["function"]["name"] for m in messages for c in m.get("tool_calls") or []),
                                      *(t["function"]["name"] for t in tools or [])])
    for t in (template, marked):
        if dropped:  # the template renders without the tools or calls: loratune refuses to train on it
            with pytest.raises(RenderError, match="leaves out the (tool calls of message|record's tools)"):
                render_conversation(messages, t, tok, info, tools=tools)
            continue
        if reference is None:
            with pytest.raises(RenderError):
                render_conversation(messages, t, tok, info, tools=tools)
            continue
        ids, labels = render_conversation(messages, t, tok, info, tools=tools)
        want_ids, want_labels = reference
        lost = [m["content"].strip() for m in messages if m["role"] == "system" and m["content"].strip() not in text]
        if lost:  # the template writes the system prompt only into a prompt that ends with a user turn (Mistral)
            last_user = max(j for j, m in enumerate(messages) if m["role"] == "user")
            head = tok.apply_chat_template(messages[:last_user + 1], tools=tools, add_generation_prompt=True,
                                           return_dict=False)
            assert ids[:len(head)] == head and all(c in tok.decode(head) for c in lost)
            assert labels[0] == IGNORE and _runs(tok, ids, labels) == _runs(tok, want_ids, want_labels)
            continue
        assert ids == want_ids  # one rendering, one tokenization, the template's own BOS
        assert labels[0] == IGNORE
        assert labels[1:] == want_labels[1:], (t.name, tok.decode([i for i, x in zip(ids, labels) if x != IGNORE]))


@pytest.mark.parametrize("family", ["llama3", "llama3_1", "qwen3", "gemma3", "deepseek_v3", "mistral_nemo"])
def test_inference_stops_at_the_end_of_turn_training_supervises(tokenizer_dir, family: str) -> None:
    """The end-of-turn token a trained turn ends with is a stop token of chat and serve (Llama 3's original
    release: <|eot_id|> is not its eos, nor a named special token, and decoding skips it as text)."""
    import torch

    from loratune.infer.load import make_format

    tok, info = _loaded(str(tokenizer_dir(family)))
    template = resolve_template("auto", tok)
    ids, labels = render_conversation([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}],
                                      template, tok, info)
    last_supervised = [i for i, x in zip(ids, labels, strict=True) if x != IGNORE][-1]
    model = torch.nn.Module()  # no generation config: stops come from the tokenizer and the template alone
    fmt = make_format(tok, info, model, template.stop)
    assert last_supervised in fmt.stop_ids and fmt.stop_strings == ()


def test_a_tokenizer_without_template_is_served_as_it_is_trained(tokenizer_dir) -> None:
    """gpt-oss's tokenizer ships no chat template: chat and serve fall back exactly as training does."""
    import torch

    from loratune.infer.load import make_format

    tok, info = _loaded(str(tokenizer_dir("gptoss")))
    assert not tok.chat_template
    fmt = make_format(tok, info, torch.nn.Module(), None)
    assert fmt.template == resolve_template("auto", tok) and fmt.template.name == "guanaco"
    assert fmt.stop_ids == {tok.eos_token_id}
