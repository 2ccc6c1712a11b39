"""`loratune chat`: a terminal conversation with a model or an adapter, streamed token by token.

Interactive when stdin is a terminal: multi-turn history, slash commands, and Ctrl-C stops the current
answer (the part shown stays in the history) without leaving; Ctrl-D or /exit leaves. With `--prompt`
or piped stdin it answers once and exits, for scripts. All generation goes through the engine; this file
only reads lines, prints text and keeps the conversation.

With `--tools FILE.json` (a JSON list of OpenAI tool schemas) the tools go to the chat template, and
tool calls in an answer are parsed in the template's own convention (`infer/tools.py`) and printed on
lines of their own, `[tool call] NAME {ARGUMENTS}`; `/tool RESULT` answers the oldest unanswered call,
and once all are answered the model goes on.
"""

from __future__ import annotations

import json
import re
import signal
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TextIO

from loratune.data.render import RenderError
from loratune.errors import LoratuneError
from loratune.infer.engine import Delta, Finish
from loratune.infer.load import Engine
from loratune.infer.sampling import SamplingParams
from loratune.infer.tools import ToolCallStream

HELP = """commands:
  /reset                 forget the conversation (the system prompt stays)
  /system TEXT           set the system prompt (and reset); /system alone removes it
  /set KEY=VALUE ...     temperature, top_p, top_k, max_tokens, repetition_penalty, seed
  /show                  the current settings and system prompt
  /tool RESULT           answer the oldest pending tool call (with --tools)
  /help                  this help
  /exit                  leave (also /quit or Ctrl-D)
Ctrl-C stops the answer being written."""

# /set names -> SamplingParams fields and how to read their values
SETTABLE: dict[str, tuple[str, Callable[[str], object]]] = {
    "temperature": ("temperature", float), "top_p": ("top_p", float), "top_k": ("top_k", int),
    "max_tokens": ("max_new_tokens", int), "max_new_tokens": ("max_new_tokens", int),
    "repetition_penalty": ("repetition_penalty", float),
    "seed": ("seed", lambda v: None if v.lower() in ("none", "random", "") else int(v)),
}


@dataclass
class Conversation:
    """The history sent to the model each turn, the tools it may call and the calls still unanswered."""

    system: str | None = None
    turns: list[dict] = field(default_factory=list)
    tools: list[dict] | None = None
    pending: list[dict] = field(default_factory=list)  # tool calls of the last answer not yet answered

    def messages(self) -> list[dict]:
        head = [{"role": "system", "content": self.system}] if self.system else []
        return head + self.turns

    def add_answer(self, text: str, calls: list[dict]) -> None:
        """The assistant's answer; its tool calls are kept as training records keep them (arguments an object)."""
        turn: dict = {"role": "assistant", "content": text}
        if calls:
            turn["tool_calls"] = [{"id": c["id"], "type": "function",
                                   "function": {"name": c["function"]["name"],
                                                "arguments": json.loads(c["function"]["arguments"])}}
                                  for c in calls]
        self.turns.append(turn)
        self.pending = list(turn.get("tool_calls", []))

    def answer_tool(self, result: str) -> None:
        if not self.pending:
            raise LoratuneError("/tool answers a tool call, and none is waiting")
        call = self.pending.pop(0)
        self.turns.append({"role": "tool", "tool_call_id": call["id"], "name": call["function"]["name"],
                           "content": result})

    def reset(self) -> None:
        self.turns.clear()
        self.pending.clear()


TOOL_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


def read_tools(path: str | Path) -> list[dict]:
    """`--tools FILE.json`: a JSON list of OpenAI tool schemas (`{"type": "function", "function": {"name",
    "description", "parameters"}}`; the bare function object is taken too), checked and wrapped."""
    file = Path(path)
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except OSError as e:
        raise LoratuneError(f"--tools {file}: cannot read it ({e.strerror})") from None
    except ValueError as e:
        raise LoratuneError(f"--tools {file}: not valid JSON ({e})") from None
    if not isinstance(data, list) or not data:
        raise LoratuneError(f"--tools {file}: expected a non-empty JSON list of tool schemas")
    tools = []
    for i, tool in enumerate(data):
        fn = tool.get("function", tool) if isinstance(tool, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not TOOL_NAME.match(fn["name"]):
            raise LoratuneError(f"--tools {file}: item {i}: expected {{\"type\": \"function\", \"function\": "
                                f"{{\"name\": ...}}}} with a name of 1-64 letters, digits, _ or -; got {json.dumps(tool)[:80]}")
        if not isinstance(fn.get("parameters", {}), dict) or not isinstance(fn.get("description", ""), str):
            raise LoratuneError(f"--tools {file}: item {i} ({fn['name']}): parameters must be a JSON schema "
                                "object and description a string")
        tools.append({"type": "function", "function": fn})
    return tools


def format_call(call: dict) -> str:
    """How a tool call is printed: on its own line, marked, with its arguments as JSON."""
    return f"[tool call] {call['function']['name']} {call['function']['arguments']}"


class StopFlag:
    """Set by Ctrl-C while an answer streams; the engine polls it between tokens."""

    def __init__(self) -> None:
        self._event = threading.Event()

    def __call__(self) -> bool:
        return self._event.is_set()

    def __enter__(self) -> "StopFlag":
        self._event.clear()
        self._previous = signal.signal(signal.SIGINT, lambda *_: self._event.set())
        return self

    def __exit__(self, *exc) -> None:
        signal.signal(signal.SIGINT, self._previous)


def answer(engine: Engine, name: str | None, convo: Conversation, params: SamplingParams, out: TextIO,
           cancel: Callable[[], bool] = lambda: False) -> tuple[str, Finish | None, list[dict]]:
    """Stream one answer to `out`; return its text, how it finished (None: interrupted) and its tool calls
    (printed after the text, one per line), which it records in the conversation."""
    text, finish, calls = [], None, []
    syntax = engine.format(name).tool_syntax if convo.tools else None
    calls_from = ToolCallStream(syntax) if syntax else None
    events = engine.chat(convo.messages(), params, name, cancel, tools=convo.tools)

    def emit(piece: str) -> None:
        text.append(piece)
        out.write(piece)
        out.flush()

    try:
        for ev in events:
            if isinstance(ev, Delta):
                emit(calls_from.feed(ev.text) if calls_from else ev.text)
            else:
                finish = ev
    except KeyboardInterrupt:  # Ctrl-C outside the window where StopFlag catches it
        finish = None
    finally:
        events.close()  # releases the engine even when interrupted mid-stream
    if calls_from:
        tail, calls = calls_from.finish()
        emit(tail)
        for i, call in enumerate(calls):  # each on a line of its own, after the text
            out.write(("\n" if i or "".join(text) else "") + format_call(call))
    convo.add_answer("".join(text), calls)
    return "".join(text), finish, calls


def apply_set(params: SamplingParams, args: str) -> SamplingParams:
    updates = {}
    for item in args.split():
        key, sep, value = item.partition("=")
        if not sep or key not in SETTABLE:
            raise LoratuneError(f"/set takes KEY=VALUE with KEY one of {', '.join(SETTABLE)}; got {item!r}")
        fname, conv = SETTABLE[key]
        try:
            updates[fname] = conv(value)
        except ValueError:
            raise LoratuneError(f"/set {key}: {value!r} is not a valid value") from None
    if not updates:
        raise LoratuneError("/set needs KEY=VALUE, e.g. /set temperature=0.2")
    return params.with_updates(**updates)


def show(params: SamplingParams, convo: Conversation) -> str:
    names = {f.name for f in fields(params)} - {"stop"}
    settings = " ".join(f"{k}={getattr(params, k)}" for k in sorted(names))
    return f"{settings}\nsystem: {convo.system or '(none)'}\nturns: {len(convo.turns)}"


def interactive(engine: Engine, name: str | None, params: SamplingParams, system: str | None,
                inp: TextIO = sys.stdin, out: TextIO = sys.stdout, tools: list[dict] | None = None) -> int:
    try:
        import readline  # noqa: F401  (line editing and history for input())
    except ImportError:
        pass
    convo = Conversation(system=system, tools=tools)
    label = name or engine.default
    out.write(f"loratune chat with {label!r}. /help for commands, Ctrl-C stops an answer, /exit leaves.\n")
    while True:
        try:
            line = input(">>> ")
        except EOFError:
            out.write("\n")
            return 0
        except KeyboardInterrupt:
            out.write("\n(Ctrl-C stops an answer; /exit or Ctrl-D leaves)\n")
            continue
        line = line.strip()
        if not line:
            continue
        if line.startswith("/"):
            cmd, _, rest = line.partition(" ")
            if cmd in ("/exit", "/quit"):
                return 0
            try:
                if cmd == "/tool":  # a tool's result; the model goes on once every call has one
                    before = len(convo.turns)
                    convo.answer_tool(rest.strip())
                    if not convo.pending:
                        reply(engine, name, convo, params, out, before)
                    continue
                params = command(cmd, rest.strip(), params, convo, out)
            except LoratuneError as e:
                out.write(f"error: {e}\n")
            continue
        before = len(convo.turns)
        convo.pending.clear()  # a new question leaves unanswered calls unanswered
        convo.turns.append({"role": "user", "content": line})
        reply(engine, name, convo, params, out, before)


def reply(engine: Engine, name: str | None, convo: Conversation, params: SamplingParams, out: TextIO,
          before: int) -> None:
    """The assistant's next answer, streamed; a conversation the template rejects goes back to `before` turns."""
    try:
        with StopFlag() as stop:
            _, finish, _ = answer(engine, name, convo, params, out, stop)
    except RenderError as e:  # the template rejects the conversation: say so, keep the session
        del convo.turns[before:]
        out.write(f"error: {e}\n")
        return
    if finish is None or finish.reason == "cancelled":
        out.write(" [stopped]")
    elif finish.reason == "length":
        out.write(" [max_tokens reached]")
    out.write("\n")


def command(cmd: str, rest: str, params: SamplingParams, convo: Conversation, out: TextIO) -> SamplingParams:
    """Run one slash command; returns the (possibly changed) sampling settings."""
    if cmd == "/help":
        out.write(HELP + "\n")
    elif cmd == "/reset":
        convo.reset()
        out.write("(conversation reset)\n")
    elif cmd == "/system":
        convo.system = rest or None
        convo.reset()
        out.write(f"(system prompt {'set' if rest else 'removed'}; conversation reset)\n")
    elif cmd == "/set":
        params = apply_set(params, rest)
        out.write(show(params, convo).splitlines()[0] + "\n")
    elif cmd == "/show":
        out.write(show(params, convo) + "\n")
    else:
        raise LoratuneError(f"unknown command {cmd}; /help lists them")
    return params


def run_chat(sources: list[str], *, name: str | None = None, bits: int | None = None, system: str | None = None,
             prompt: str | None = None, params: SamplingParams = SamplingParams(),
             tools_file: str | Path | None = None) -> int:
    """`loratune chat`: interactive on a terminal, else answer `prompt` (or stdin) once."""
    from loratune.infer.load import load_engine, quiet_library_noise, quiet_loading

    params.validate()
    tools = read_tools(tools_file) if tools_file is not None else None
    if prompt is None and not sys.stdin.isatty():
        prompt = sys.stdin.read().strip()
        if not prompt:
            raise LoratuneError("no prompt: stdin was empty")
    quiet_library_noise()
    with quiet_loading():
        engine = load_engine(sources, bits=bits, implementation=None)
    if name is not None and name not in engine.adapters:
        raise LoratuneError(f"--model {name!r} is not loaded; loaded: {', '.join(engine.names)}")
    if tools and engine.format(name).tool_syntax is None:
        print("note: this model's chat template writes tool calls in no form loratune recognises; they are "
              "shown as text", file=sys.stderr)
    if prompt is None:
        return interactive(engine, name, params, system, tools=tools)
    convo = Conversation(system=system, turns=[{"role": "user", "content": prompt}], tools=tools)
    try:
        _, finish, _ = answer(engine, name, convo, params, sys.stdout)
    except RenderError as e:
        raise LoratuneError(str(e)) from None
    sys.stdout.write("\n")
    return 130 if finish is None or finish.reason == "cancelled" else 0
