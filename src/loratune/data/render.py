"""The one place that turns a conversation (or a plain text) into token ids and labels.

Labels come from rendering, never from searching token ids for marker strings:

1. Render the whole conversation with the chat template (the same Jinja renderer as
   `tokenizer.apply_chat_template`), and for each trained assistant message i render two prefixes:
   the conversation before it with the generation prompt, and the conversation through it. The
   assistant's text is what lies between them, which gives a character span: from the end of the
   generation prompt to the end of the template's end-of-turn text (`ChatTemplate.stop`), so the
   end-of-turn token is supervised and whatever the template writes after it (a newline) is not.
2. Check the prefix property (each prefix is a prefix of the full text); a template that renders earlier
   turns differently depending on what follows is rejected with a clear error instead of mislabelled.
   Check too that nothing is dropped silently: the text of every non-assistant message, the name of every
   tool schema and of every tool call must appear in the rendering (a template without a tool role, or
   one that ignores `tools`, would otherwise train the model on a conversation it never sees).
3. Tokenize the full text once with character offsets and supervise the tokens that overlap a span.

Exactly one BOS: the text is tokenized without special tokens; BOS is prepended when the tokenizer adds
one to plain text and the template did not render it, and a sequence with two is rejected. The first
token never carries a label (nothing predicts it), which also keeps packed samples independent.
"""

from __future__ import annotations

from dataclasses import dataclass

from loratune.data.templates import ChatTemplate, render_text
from loratune.model.load import TokenizerInfo

IGNORE = -100


class RenderError(ValueError):
    """A conversation cannot be rendered into labels; the caller adds the file and row."""


@dataclass
class Plan:
    """Rendered text and the character spans [start, end) that carry loss."""

    text: str
    spans: list[tuple[int, int]]


def _render(tokenizer, template: ChatTemplate, messages: list[dict], gen: bool, tools: list | None) -> str:
    try:
        return render_text(tokenizer, template.jinja, messages, add_generation_prompt=gen, tools=tools)
    except Exception as e:  # jinja's raise_exception and template bugs: report the template's own words
        raise RenderError(f"chat template {template.name!r} rejected the conversation: {e}") from None


def plan_conversation(messages: list[dict], template: ChatTemplate, tokenizer, train_on: str = "assistant",
                      tools: list | None = None) -> Plan:
    """Render `messages` and locate the supervised character spans (see the module docstring)."""
    full = _render(tokenizer, template, messages, False, tools)
    _check_nothing_dropped(full, messages, tools, template)
    if train_on == "all":
        return Plan(full, [(0, len(full))])
    trained = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    if train_on == "last":
        trained = trained[-1:]
    stop = template.stop_text(tokenizer.eos_token)
    spans = []
    for i in trained:
        before = _render(tokenizer, template, messages[:i], True, tools)
        through = _render(tokenizer, template, messages[:i + 1], False, tools)
        if not (through.startswith(before) and full.startswith(through)):
            raise RenderError(
                f"chat template {template.name!r} is not prefix-stable: the conversation rendered up to message {i} "
                "(assistant) is not a prefix of the whole rendering, so its assistant turns cannot be located exactly; "
                "use a template that renders earlier turns the same whatever follows, or data.train_on=last")
        turn = through[len(before):]
        k = turn.rfind(stop)
        if k < 0:
            raise RenderError(f"chat template {template.name!r} does not end assistant message {i} with its "
                              f"end-of-turn text {stop!r}, so the model could not learn to stop")
        spans.append((len(before), len(before) + k + len(stop)))
    return Plan(full, spans)


def _check_nothing_dropped(full: str, messages: list[dict], tools: list | None, template: ChatTemplate) -> None:
    for i, m in enumerate(messages):
        text = m["content"].strip()
        if m["role"] != "assistant" and text and text not in full:
            raise RenderError(f"chat template {template.name!r} leaves out message {i} ({m['role']}): its text is not in "
                              f"the rendering; use a template that renders {m['role']} messages")
        for call in m.get("tool_calls") or []:
            if call["function"]["name"] not in full:
                raise RenderError(f"chat template {template.name!r} leaves out the tool calls of message {i}; use a "
                                  "template that renders tool_calls (every built-in one does)")
    for tool in tools or []:
        if tool["function"]["name"] not in full:
            raise RenderError(f"chat template {template.name!r} leaves out the record's tools; use a template that "
                              "renders tools (every built-in one does)")


def plan_text(text: str, tokenizer) -> Plan:
    """Plain text for continued pretraining: loss on every token, eos appended to close the document."""
    full = text + tokenizer.eos_token
    return Plan(full, [(0, len(full))])


def _labels_from_offsets(ids: list[int], offsets: list[tuple[int, int]], spans: list[tuple[int, int]]) -> list[int]:
    """Supervise each token whose characters overlap a span (tokens and spans are both in text order)."""
    labels = [IGNORE] * len(ids)
    j = 0
    for t, (a, b) in enumerate(offsets):
        b = max(b, a + 1)  # a zero-width token (trimmed whitespace) still sits at one position
        while j < len(spans) and spans[j][1] <= a:
            j += 1
        if j < len(spans) and spans[j][0] < b:
            labels[t] = ids[t]
    return labels


def _encode_pieces(tokenizer, plan: Plan) -> tuple[list[int], list[int]]:
    """Slow tokenizers have no offsets: tokenize the text piece by piece, cut at the span boundaries."""
    cuts = sorted({0, len(plan.text), *(c for s in plan.spans for c in s)})
    ids: list[int] = []
    labels: list[int] = []
    for a, b in zip(cuts, cuts[1:]):
        piece = tokenizer.encode(plan.text[a:b], add_special_tokens=False)
        inside = any(s <= a and b <= e for s, e in plan.spans)
        ids += piece
        labels += piece if inside else [IGNORE] * len(piece)
    return ids, labels


def _finish(ids: list[int], labels: list[int], info: TokenizerInfo) -> tuple[list[int], list[int]]:
    """Exactly one BOS, and no label on the first token."""
    if info.adds_bos and info.bos_id is not None and (not ids or ids[0] != info.bos_id):
        ids, labels = [info.bos_id, *ids], [IGNORE, *labels]
    if info.bos_id is not None and info.bos_id not in (info.eos_id, info.pad_id) and ids.count(info.bos_id) > 1:
        raise RenderError(f"the sequence holds {ids.count(info.bos_id)} BOS tokens ({info.bos_token!r}); expected "
                          "exactly one: does a message contain the BOS text?")
    if labels:
        labels[0] = IGNORE
    return ids, labels


def encode(plans: list[Plan], tokenizer, info: TokenizerInfo) -> list[tuple[list[int], list[int]]]:
    """Tokenize rendered plans (in one batch call, which the Rust tokenizer runs in parallel)."""
    if not plans:
        return []
    if not getattr(tokenizer, "is_fast", False):
        return [_finish(*_encode_pieces(tokenizer, p), info) for p in plans]
    enc = tokenizer([p.text for p in plans], add_special_tokens=False, return_offsets_mapping=True)
    return [_finish(list(ids), _labels_from_offsets(ids, offs, p.spans), info)
            for ids, offs, p in zip(enc["input_ids"], enc["offset_mapping"], plans)]


def render_conversation(messages: list[dict], template: ChatTemplate, tokenizer, info: TokenizerInfo,
                        train_on: str = "assistant", tools: list | None = None) -> tuple[list[int], list[int]]:
    """(input_ids, labels) of one conversation; labels are -100 where no loss is taken (not shifted)."""
    return encode([plan_conversation(messages, template, tokenizer, train_on, tools)], tokenizer, info)[0]


def encode_prompt(messages: list[dict], template: ChatTemplate, tokenizer, info: TokenizerInfo,
                  tools: list | None = None) -> list[int]:
    """Token ids of a prompt for generation: the conversation plus the generation prompt, rendered and
    BOS-handled exactly as in training, so serving sees what training saw."""
    text = _render(tokenizer, template, messages, True, tools)
    return _finish(tokenizer(text, add_special_tokens=False)["input_ids"], [], info)[0]
