"""Normalise records of every supported format into one type: a conversation, or a plain text.

Formats form a registry (a plain dict of name -> converter). `auto` detects a record's format from its
keys; one file must hold one format. Converters validate as they go and raise `DataError` with one
line naming the file, the row, the key and what was expected, so a bad record never reaches the
tokenizer as a `KeyError`. Key names can be remapped per dataset (`columns` in the config).

Messages come out as dicts with `role` in system/user/assistant/tool and a string `content`; `name` and
`tool_call_id` pass through, and an assistant's reasoning (`reasoning_content`, `reasoning` or `thinking`)
is kept as `reasoning_content`, which reasoning models' templates render. Tool calls are normalised to one
shape whatever the source (OpenAI `tool_calls`, whose arguments may be a JSON string, or a sharegpt
`function_call` turn holding JSON):
`{"type": "function", "function": {"name": str, "arguments": dict}}`, and tool schemas (OpenAI's wrapped
form or a bare `{name, description, parameters}`) to `{"type": "function", "function": {...}}`, so that
templates (built-in or a model's own) see what `tokenizer.apply_chat_template` users pass.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from loratune.config import ColumnsConfig
from loratune.data.readers import Record
from loratune.errors import DataError

ROLES = ("system", "user", "assistant", "tool")
# Role names of sharegpt and other common dumps, mapped to ours.
ROLE_ALIASES = {"system": "system", "user": "user", "human": "user", "assistant": "assistant", "gpt": "assistant",
                "model": "assistant", "bot": "assistant", "function_call": "assistant", "tool": "tool",
                "observation": "tool", "function": "tool", "ipython": "tool"}
PASSTHROUGH = ("name", "tool_call_id")
REASONING = ("reasoning_content", "reasoning", "thinking")  # the names datasets use, kept as reasoning_content
OASST_TURN = re.compile(r"###\s*(Human|Assistant)\s*:")


@dataclass
class Example:
    """A normalised record: a conversation (`messages`, optional `tools`) or a plain `text`."""

    messages: list[dict] = field(default_factory=list)
    tools: list | None = None
    text: str | None = None


class _Row:
    """Key access on one record with errors that say where and what: `row.get('output')`."""

    def __init__(self, rec: Record, columns: ColumnsConfig | None) -> None:
        self.rec, self.cols = rec, columns or ColumnsConfig()
        if not isinstance(rec.data, dict):
            self.fail(None, f"expected a record (a JSON object / mapping of keys), got {_kind(rec.data)}")

    def key(self, name: str, default: str | None = None) -> str:
        return getattr(self.cols, name, None) or default or name

    def fail(self, key: str | None, what: str) -> None:
        where = f"key '{key}': " if key else ""
        raise DataError(f"{self.rec.source}: row {self.rec.row}: {where}{what}")

    def has(self, name: str, default: str | None = None) -> bool:
        v = self.rec.data.get(self.key(name, default))
        return v is not None and v != ""

    def get(self, name: str, expected: str, default: str | None = None) -> Any:
        k = self.key(name, default)
        if k not in self.rec.data or self.rec.data[k] is None:
            mapped = f" (set by columns.{name})" if getattr(self.cols, name, None) else ""
            self.fail(None, f"missing key '{k}'{mapped}; expected {expected}; the record has keys: "
                            f"{', '.join(map(str, self.rec.data)) or 'none'}")
        return self.rec.data[k]

    def text(self, name: str, expected: str, optional: bool = False) -> str:
        if optional and not self.has(name):
            return ""
        v = self.get(name, expected)
        if not isinstance(v, str):
            self.fail(self.key(name), f"expected a string, got {_kind(v)}")
        if not optional and not v.strip():
            self.fail(self.key(name), "empty text; expected non-empty text")
        return v

    def listish(self, name: str, expected: str, optional: bool = False, default: str | None = None) -> list | None:
        """A list value; a JSON string holding a list is accepted (CSV and Parquet columns store those)."""
        if optional and not self.has(name, default):
            return None
        v = self.get(name, expected, default)
        if isinstance(v, str) and v.lstrip().startswith("["):
            try:
                v = json.loads(v)
            except json.JSONDecodeError as e:
                self.fail(self.key(name, default), f"not valid JSON ({e.msg}); expected {expected}")
        if not isinstance(v, (list, tuple)):
            self.fail(self.key(name, default), f"expected {expected}, got {_kind(v)}")
        return list(v)


def _kind(v: Any) -> str:
    names = {str: "a string", int: "an integer", float: "a number", bool: "true/false", list: "a list",
             dict: "an object", type(None): "null"}
    return names.get(type(v), type(v).__name__)


def _content(row: _Row, key: str, value: Any, role: str, msg: dict) -> str:
    """A message's text: a string, or OpenAI content parts [{type: text, text: ...}] joined."""
    if value is None and role == "assistant" and msg.get("tool_calls"):
        return ""
    if isinstance(value, list) and all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                                       for p in value):
        value = "".join(p["text"] for p in value)
    if not isinstance(value, str):
        row.fail(key, f"expected a string (or a list of {{type: text, text}} parts), got {_kind(value)}")
    if not value.strip() and role != "system" and not msg.get("tool_calls"):
        row.fail(key, f"empty {role} turn; expected non-empty text")
    return value


def _conversation(row: _Row, list_default: str, role_default: str, content_default: str) -> Example:
    """messages (role/content) and sharegpt (from/value): the same shape under different key names."""
    if not row.cols.messages and list_default not in row.rec.data:  # the other format's list key
        list_default = next((k for k in ("messages", "conversations") if k in row.rec.data), list_default)
    lkey, rkey, ckey = row.key("messages", list_default), row.key("role", role_default), row.key("content", content_default)
    expected = f"a list of {{{rkey}, {ckey}}}"
    turns = row.listish("messages", expected, default=list_default)
    if not turns:
        row.fail(lkey, f"empty conversation; expected {expected}")
    messages = []
    for i, m in enumerate(turns):
        at = f"{lkey}[{i}]"
        if not isinstance(m, dict):
            row.fail(at, f"expected {{{rkey}, {ckey}}}, got {_kind(m)}")
        for k in (rkey, ckey):
            if k not in m:
                row.fail(at, f"missing key '{k}'; expected {{{rkey}, {ckey}}}, got keys {', '.join(map(str, m)) or 'none'}")
        raw_role = m[rkey]
        role = ROLE_ALIASES.get(raw_role.strip().lower()) if isinstance(raw_role, str) else None
        if role is None:
            row.fail(f"{at}.{rkey}", f"unknown role {json.dumps(raw_role)}; expected one of {', '.join(ROLES)} "
                                     "(or human, gpt, function_call, observation)")
        msg = {"role": role, **{k: m[k] for k in PASSTHROUGH if m.get(k) is not None}}
        reasoning = next((k for k in REASONING if m.get(k) is not None), None)
        if reasoning is not None:  # a reasoning model's thinking, for templates that render it (Qwen3's <think>)
            if role != "assistant":
                row.fail(f"{at}.{reasoning}", f"reasoning belongs to assistant messages, not to a {role} message")
            if not isinstance(m[reasoning], str):
                row.fail(f"{at}.{reasoning}", f"expected a string, got {_kind(m[reasoning])}")
            msg["reasoning_content"] = m[reasoning]
        if raw_role.strip().lower() == "function_call":  # sharegpt: the turn's text is the call as JSON
            msg["tool_calls"] = _tool_calls(row, f"{at}.{ckey}", m[ckey], from_text=True)
            msg["content"] = ""
        else:
            if m.get("tool_calls") is not None:
                msg["tool_calls"] = _tool_calls(row, f"{at}.tool_calls", m["tool_calls"])
            msg["content"] = _content(row, f"{at}.{ckey}", m[ckey], role, msg)
        messages.append(msg)
    tools = _tools(row)
    return Example(_with_system(row, messages) if messages[0]["role"] != "system" else messages, tools=tools)


def _json_text(row: _Row, at: str, value: Any, expected: str) -> Any:
    """A value that may arrive as JSON text (sharegpt turns, CSV cells, OpenAI arguments), parsed."""
    if not isinstance(value, str):
        return value
    try:
        return json.loads(value)
    except json.JSONDecodeError as e:
        row.fail(at, f"not valid JSON ({e.msg} at column {e.colno}); expected {expected}")


def _tool_calls(row: _Row, at: str, value: Any, from_text: bool = False) -> list[dict]:
    """OpenAI `tool_calls` or a sharegpt function_call text -> [{type: function, function: {name, arguments}}]."""
    expected = ('a JSON object {"name": ..., "arguments": {...}} (or a list of them)' if from_text
                else 'a list of {"function": {"name": ..., "arguments": ...}}')
    calls = _json_text(row, at, value, expected)
    if from_text and isinstance(calls, dict):
        calls = [calls]
    if not isinstance(calls, list) or not calls:
        row.fail(at, f"expected {expected}, got {_kind(calls) if calls != [] else 'an empty list'}")
    out = []
    for i, call in enumerate(calls):
        here = f"{at}[{i}]"
        fn = call.get("function", call) if isinstance(call, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"].strip():
            row.fail(here, f"expected a call with a non-empty string \"name\", got {json.dumps(call)[:80]}")
        args = _json_text(row, f"{here}.arguments", fn.get("arguments", {}), "the arguments as a JSON object")
        if not isinstance(args, dict):
            row.fail(f"{here}.arguments", f"expected a JSON object of arguments, got {_kind(args)}")
        done = {"type": "function", "function": {"name": fn["name"], "arguments": args}}
        if isinstance(call, dict) and isinstance(call.get("id"), str):
            done["id"] = call["id"]
        out.append(done)
    return out


def _tools(row: _Row) -> list[dict] | None:
    """The record's tool schemas (OpenAI's wrapped form or bare {name, description, parameters}), wrapped."""
    tools = row.listish("tools", "a list of tool schemas", optional=True)
    if tools is None:
        return None
    out = []
    for i, tool in enumerate(tools):
        fn = tool.get("function", tool) if isinstance(tool, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"].strip():
            row.fail(f"{row.key('tools')}[{i}]", f"expected a tool schema with a non-empty string \"name\", "
                                                 f"got {json.dumps(tool)[:80]}")
        out.append({"type": "function", "function": fn})
    return out or None


def _messages(row: _Row) -> Example:
    return _conversation(row, "messages", "role", "content")


def _sharegpt(row: _Row) -> Example:
    return _conversation(row, "conversations", "from", "value")


def _with_system(row: _Row, messages: list[dict]) -> list[dict]:
    system = row.text("system", "a string", optional=True)
    return ([{"role": "system", "content": system}] if system.strip() else []) + messages


def _alpaca(row: _Row) -> Example:
    expected = "instruction and output (alpaca format; optional input, system, history)"
    instruction = row.text("instruction", expected, optional=row.has("input"))
    extra = row.text("input", expected, optional=True)
    output = row.text("output", expected)
    messages = []
    for i, pair in enumerate(row.listish("history", "a list of [instruction, response] pairs", optional=True) or []):
        if not (isinstance(pair, (list, tuple)) and len(pair) == 2 and all(isinstance(s, str) and s.strip() for s in pair)):
            row.fail(f"{row.key('history')}[{i}]", f"expected an [instruction, response] pair of non-empty strings, got {pair!r:.60}")
        messages += [{"role": "user", "content": pair[0]}, {"role": "assistant", "content": pair[1]}]
    prompt = "\n\n".join(s for s in (instruction, extra) if s.strip())
    messages += [{"role": "user", "content": prompt}, {"role": "assistant", "content": output}]
    return Example(_with_system(row, messages))


def _pair(prompt_key: str, answer_key: str, fmt: str) -> Callable[[_Row], Example]:
    def convert(row: _Row) -> Example:
        expected = f"{prompt_key} and {answer_key} ({fmt} format)"
        messages = [{"role": "user", "content": row.text(prompt_key, expected)},
                    {"role": "assistant", "content": row.text(answer_key, expected)}]
        return Example(_with_system(row, messages))

    return convert


def _text(row: _Row) -> Example:
    return Example(text=row.text("text", "text (plain text format)"))


def _oasst(row: _Row) -> Example:
    """'### Human: ... ### Assistant: ...' (OASST1 as the QLoRA paper trained on it) parsed into turns."""
    text = row.text("text", "text holding '### Human: ... ### Assistant: ...' turns (oasst format)")
    parts = OASST_TURN.split(text)
    if len(parts) < 3:
        row.fail(row.key("text"), "no '### Human:' / '### Assistant:' turns found; expected the oasst text form")
    messages = [{"role": "system", "content": parts[0].strip()}] if parts[0].strip() else []
    for i in range(1, len(parts), 2):
        role, content = ("user" if parts[i] == "Human" else "assistant"), parts[i + 1].strip()
        if not content:
            row.fail(row.key("text"), f"empty {role} turn (turn {i // 2 + 1}); expected non-empty text")
        messages.append({"role": role, "content": content})
    return Example(messages)


FORMATS: dict[str, Callable[[_Row], Example]] = {
    "messages": _messages,
    "sharegpt": _sharegpt,
    "alpaca": _alpaca,
    "input_output": _pair("input", "output", "input_output"),
    "prompt_completion": _pair("prompt", "completion", "prompt_completion"),
    "text": _text,
    "oasst": _oasst,
}


def detect(row: _Row) -> str:
    """The format of one record, from its keys."""
    data = row.rec.data
    for list_default in ("messages", "conversations"):
        turns = data.get(row.key("messages", list_default))
        if isinstance(turns, str) and turns.lstrip().startswith("["):
            turns = row.listish("messages", "a list of messages", default=list_default)
        if isinstance(turns, list):
            first = turns[0] if turns and isinstance(turns[0], dict) else {}
            if row.cols.role:
                return "messages"
            if ("from" in first) != ("role" in first):  # the message keys decide when they can
                return "sharegpt" if "from" in first else "messages"
            return "messages" if list_default == "messages" else "sharegpt"
        if row.key("messages", list_default) in data:  # present but not a list: the converter says so
            return "messages" if list_default == "messages" else "sharegpt"
    present = {name for name in ("instruction", "prompt", "completion", "input", "output", "text") if row.key(name) in data}
    if "instruction" in present:
        return "alpaca"
    if present & {"prompt", "completion"}:
        return "prompt_completion"
    if present & {"input", "output"}:
        return "input_output"
    if "text" in present:
        value = data.get(row.key("text"))
        return "oasst" if isinstance(value, str) and set(OASST_TURN.findall(value)) == {"Human", "Assistant"} else "text"
    if not isinstance(data, dict) or not data:
        row.fail(None, "empty record; expected keys of a known format")
    row.fail(None, f"cannot tell the format from keys {', '.join(map(str, data))}; expected messages (role/content), "
                   "conversations (from/value), instruction/output, prompt/completion, input/output or text; "
                   "or set the dataset's format and columns")
    raise AssertionError  # unreachable: fail() raises


class Normaliser:
    """Turns the records of one dataset into `Example`s, detecting the format once per file."""

    def __init__(self, fmt: str, columns: ColumnsConfig | None, system: str | None) -> None:
        self.fmt, self.columns, self.system = fmt, columns, system
        self.detected: dict[str, tuple[str, int]] = {}  # source -> (format, first row)

    def __call__(self, rec: Record) -> Example:
        row = _Row(rec, self.columns)
        fmt = self.fmt
        if fmt == "auto":
            fmt = detect(row)
            first = self.detected.setdefault(rec.source, (fmt, rec.row))
            if first[0] != fmt:
                row.fail(None, f"mixed formats: row {first[1]} is {first[0]} but this row is {fmt}; "
                               "one file must hold one format")
        ex = FORMATS[fmt](row)
        if self.system and ex.messages and ex.messages[0]["role"] != "system":
            ex.messages.insert(0, {"role": "system", "content": self.system})
        return ex
