"""Tool calls out of generated text, in the convention the chat template itself writes them.

A model trained on a template writes tool calls the way that template renders them, so the parser is
decided from the template, never from a model's name: `call_syntax` renders a probe conversation whose
assistant turn makes one tool call (`data.templates.render_text`), and again without the call; the text
between the two renderings is how a call is written. Recognised shapes:

- a JSON object between two tags, `<tool_call>{"name": ..., "arguments": {...}}</tool_call>` (our built-in
  templates, Qwen, Hermes), one block per call;
- a tag then a JSON list of calls, `[TOOL_CALLS][{"name": ..., "arguments": {...}}]` (Mistral);
- bare JSON, `{"name": ..., "parameters": {...}}` (Llama 3.1), the whole answer being the call(s).

The key that holds the arguments (`arguments`, `parameters`) is read from the probe too. Anything else
(no call rendered, another shape, a template that fails on the probe) gives `None`: answers stay text.

`ToolCallStream` applies a syntax to a streamed answer: text that cannot be (the start of) a call is
released at once; from the first sign of a call on, text is held until the end, then parsed into OpenAI
`tool_calls` (or, if it does not parse, released as text after all). Streaming and non-streaming
answers go through it alike.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass

from loratune.data.templates import ChatTemplate, render_text

PROBE_NAME = "loratune_probe_tool"
PROBE_ARGS = {"loratune_probe_arg": "probe value 5c1e"}
PROBE_TOOL = {"type": "function", "function": {"name": PROBE_NAME, "description": "probe",
                                               "parameters": {"type": "object", "properties": {
                                                   "loratune_probe_arg": {"type": "string"}}}}}
_QUESTION = {"role": "user", "content": "loratune probe question"}


@dataclass(frozen=True)
class CallSyntax:
    """How a template writes tool calls: `open` + JSON + `close` (tags stripped of surrounding whitespace)."""

    open: str  # "" for bare JSON
    close: str  # "" for bare JSON and for a tag followed by a list
    args_key: str  # "arguments" or "parameters"
    listed: bool  # the JSON is a list of calls

    @property
    def kind(self) -> str:
        return "tagged" if self.close else "listed" if self.open else "bare JSON"


def call_syntax(tokenizer, template: ChatTemplate) -> CallSyntax | None:
    """The template's tool-call convention, found by rendering a probe call (None when not recognised)."""
    # 9 alphanumerics: Mistral's templates refuse any other call id
    call = {"id": "pr0be5c1e", "type": "function", "function": {"name": PROBE_NAME, "arguments": PROBE_ARGS}}
    try:
        with_call = _render(tokenizer, template, [{"role": "assistant", "content": "", "tool_calls": [call]}])
        without = _render(tokenizer, template, [{"role": "assistant", "content": ""}])
        prompt = _render(tokenizer, template, [], gen=True)
    except Exception:  # a template that cannot render a tool call (or raises on it) has no convention we can use
        return None
    return _syntax_of(_written_call(with_call, without, prompt, template.stop_text(tokenizer.eos_token)))


def _render(tokenizer, template: ChatTemplate, replies: list[dict], gen: bool = False) -> str:
    return render_text(tokenizer, template.jinja, [_QUESTION, *replies], add_generation_prompt=gen,
                       tools=[PROBE_TOOL], variables=template.variables)


def _written_call(with_call: str, without: str, prompt: str, stop: str) -> str:
    """The text of the probe call as the model would generate it.

    Preferably what follows the generation prompt, up to the end of turn: exactly what a model writes.
    When the rendered turn does not start with the generation prompt, the span where the renderings with
    and without the call differ (its edges may be off by text both happen to share there).
    """
    if prompt and with_call.startswith(prompt):
        answer = with_call[len(prompt):]
        end = answer.rfind(stop) if stop else -1
        return answer[:end] if end >= 0 else answer
    start = _common_prefix(with_call, without)
    return with_call[start:len(with_call) - _common_suffix(with_call[start:], without[start:])]


def _common_prefix(a: str, b: str) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def _common_suffix(a: str, b: str) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[-1 - n] == b[-1 - n]:
        n += 1
    return n


def _syntax_of(region: str) -> CallSyntax | None:
    """Find the probe call's JSON in the text a call added; the text around it is the syntax."""
    decoder = json.JSONDecoder()
    for i, ch in enumerate(region):
        if ch not in "{[":
            continue
        try:
            value, end = decoder.raw_decode(region, i)
        except ValueError:
            continue
        listed = isinstance(value, list)
        calls = value if listed else [value]
        if len(calls) != 1 or not isinstance(calls[0], dict) or calls[0].get("name") != PROBE_NAME:
            continue
        key = next((k for k, v in calls[0].items() if k != "name" and _as_args(v) == PROBE_ARGS), None)
        # the tags are the words touching the JSON: what comes before them (Qwen3's empty <think></think>,
        # a newline) is text the model may write differently, or not at all
        before, after = region[:i].split(), region[end:].split()
        opening, closing = (before[-1] if before else ""), (after[0] if after else "")
        if key is None or (closing and not opening) or (listed and closing):
            return None
        return CallSyntax(opening, closing, key, listed)
    return None


def _as_args(value: object) -> dict | None:
    """Arguments as an object, whether written as one or as a JSON string of one."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            return None
    return value if isinstance(value, dict) else None


def parse_calls(text: str, syntax: CallSyntax) -> tuple[str, list[dict]] | None:
    """(content, OpenAI tool_calls) of an answer, or None when the calls in it do not parse.

    Text outside the call blocks is the content; an answer without any call gives (text, []).
    """
    if not syntax.open:
        stripped = text.strip()
        if not stripped.startswith(("{", "[")):
            return text, []
        calls = _json_calls(stripped, syntax)
        return ("", calls) if calls else None
    content, calls, rest = [], [], text
    while (at := rest.find(syntax.open)) >= 0:
        content.append(rest[:at])
        rest = rest[at + len(syntax.open):]
        if syntax.close:
            end = rest.find(syntax.close)
            body, rest = (rest, "") if end < 0 else (rest[:end], rest[end + len(syntax.close):])
        else:
            body, rest = _leading_json(rest)
        found = _json_calls(body.strip(), syntax)
        if not found:
            return None
        calls += found
    content.append(rest)
    return "".join(content).strip(), calls


def _leading_json(text: str) -> tuple[str, str]:
    """The JSON value at the start of `text` (after whitespace) and what follows it."""
    start = len(text) - len(text.lstrip())
    try:
        _, end = json.JSONDecoder().raw_decode(text, start)
    except ValueError:
        return text, ""
    return text[start:end], text[end:]


def _json_calls(text: str, syntax: CallSyntax) -> list[dict]:
    """Calls from JSON text: one object, a list of them, or several objects separated by whitespace or ';'."""
    decoder, values, i = json.JSONDecoder(), [], 0
    while i < len(text):
        try:
            value, i = decoder.raw_decode(text, i)
        except ValueError:
            return []
        values += value if isinstance(value, list) else [value]
        while i < len(text) and text[i] in " \t\r\n;,":
            i += 1
    calls = []
    for v in values:
        name = v.get("name") if isinstance(v, dict) else None
        args = _as_args(v.get(syntax.args_key, v.get("arguments", v.get("parameters", {})))) if name else None
        if not isinstance(name, str) or not name.strip() or args is None:
            return []
        calls.append({"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
                      "function": {"name": name, "arguments": json.dumps(args, ensure_ascii=False)}})
    return calls


class ToolCallStream:
    """One answer's text in, content out as early as possible, and its tool calls at the end."""

    def __init__(self, syntax: CallSyntax) -> None:
        self.syntax = syntax
        self._text = ""
        self._emitted = 0
        self._holding = False  # a call has (possibly) started: hold everything until the end

    def feed(self, piece: str) -> str:
        """Add generated text; return the content that is safe to show now."""
        self._text += piece
        if self._holding:
            return ""
        if not self.syntax.open:  # bare JSON: an answer that opens with { or [ may be a call
            head = self._text.lstrip()
            if not head:
                return ""
            if head[0] in "{[":
                self._holding = True
                return ""
            return self._release(len(self._text))
        at = self._text.find(self.syntax.open, self._emitted)
        if at >= 0:
            self._holding = True
            return self._release(len(self._text[:at].rstrip()))
        return self._release(len(self._text) - self._held_back())

    def _held_back(self) -> int:
        """Trailing text that could still become the opening tag (with the whitespace before it)."""
        tag, text = self.syntax.open, self._text
        partial = next((n for n in range(min(len(tag) - 1, len(text)), 0, -1) if text.endswith(tag[:n])), 0)
        body = text[:len(text) - partial]
        return partial + len(body) - len(body.rstrip())

    def _release(self, upto: int) -> str:
        out = self._text[self._emitted:upto] if upto > self._emitted else ""
        self._emitted = max(self._emitted, upto)
        return out

    def finish(self) -> tuple[str, list[dict]]:
        """(content not yet shown, tool calls): unparseable held text comes back as content."""
        rest = self._text[self._emitted:]
        self._emitted = len(self._text)
        parsed = parse_calls(rest, self.syntax) if self._holding else None
        if parsed is None or not parsed[1]:
            return rest, []
        content, calls = parsed
        return content, calls
