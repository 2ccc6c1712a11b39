"""`loratune chat`: a terminal conversation with a model or an adapter, streamed token by token.

Interactive when stdin is a terminal: multi-turn history, slash commands, and Ctrl-C stops the current
answer (the part shown stays in the history) without leaving; Ctrl-D or /exit leaves. With `--prompt`
or piped stdin it answers once and exits, for scripts. All generation goes through the engine; this file
only reads lines, prints text and keeps the conversation.
"""

from __future__ import annotations

import signal
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import TextIO

from loratune.data.render import RenderError
from loratune.errors import LoratuneError
from loratune.infer.engine import Delta, Finish
from loratune.infer.load import Engine
from loratune.infer.sampling import SamplingParams

HELP = """commands:
  /reset                 forget the conversation (the system prompt stays)
  /system TEXT           set the system prompt (and reset); /system alone removes it
  /set KEY=VALUE ...     temperature, top_p, top_k, max_tokens, repetition_penalty, seed
  /show                  the current settings and system prompt
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
    """The history sent to the model each turn."""

    system: str | None = None
    turns: list[dict] = field(default_factory=list)

    def messages(self) -> list[dict]:
        head = [{"role": "system", "content": self.system}] if self.system else []
        return head + self.turns


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
           cancel: Callable[[], bool] = lambda: False) -> tuple[str, Finish]:
    """Stream one answer to `out`; return its text and how it finished (None: interrupted)."""
    text, finish = [], None
    events = engine.chat(convo.messages(), params, name, cancel)
    try:
        for ev in events:
            if isinstance(ev, Delta):
                text.append(ev.text)
                out.write(ev.text)
                out.flush()
            else:
                finish = ev
    except KeyboardInterrupt:  # Ctrl-C outside the window where StopFlag catches it
        finish = None
    finally:
        events.close()  # releases the engine even when interrupted mid-stream
    return "".join(text), finish


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
                inp: TextIO = sys.stdin, out: TextIO = sys.stdout) -> int:
    try:
        import readline  # noqa: F401  (line editing and history for input())
    except ImportError:
        pass
    convo = Conversation(system=system)
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
                params = command(cmd, rest.strip(), params, convo, out)
            except LoratuneError as e:
                out.write(f"error: {e}\n")
            continue
        convo.turns.append({"role": "user", "content": line})
        try:
            with StopFlag() as stop:
                text, finish = answer(engine, name, convo, params, out, stop)
        except RenderError as e:  # the template rejects the conversation: say so, keep the session
            convo.turns.pop()
            out.write(f"error: {e}\n")
            continue
        convo.turns.append({"role": "assistant", "content": text})
        if finish is None or finish.reason == "cancelled":
            out.write(" [stopped]")
        elif finish is not None and finish.reason == "length":
            out.write(" [max_tokens reached]")
        out.write("\n")


def command(cmd: str, rest: str, params: SamplingParams, convo: Conversation, out: TextIO) -> SamplingParams:
    """Run one slash command; returns the (possibly changed) sampling settings."""
    if cmd == "/help":
        out.write(HELP + "\n")
    elif cmd == "/reset":
        convo.turns.clear()
        out.write("(conversation reset)\n")
    elif cmd == "/system":
        convo.system = rest or None
        convo.turns.clear()
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
             prompt: str | None = None, params: SamplingParams = SamplingParams()) -> int:
    """`loratune chat`: interactive on a terminal, else answer `prompt` (or stdin) once."""
    from loratune.infer.load import load_engine, quiet_library_noise, quiet_loading

    params.validate()
    if prompt is None and not sys.stdin.isatty():
        prompt = sys.stdin.read().strip()
        if not prompt:
            raise LoratuneError("no prompt: stdin was empty")
    quiet_library_noise()
    with quiet_loading():
        engine = load_engine(sources, bits=bits)
    if name is not None and name not in engine.adapters:
        raise LoratuneError(f"--model {name!r} is not loaded; loaded: {', '.join(engine.names)}")
    if prompt is None:
        return interactive(engine, name, params, system)
    convo = Conversation(system=system, turns=[{"role": "user", "content": prompt}])
    try:
        _, finish = answer(engine, name, convo, params, sys.stdout)
    except RenderError as e:
        raise LoratuneError(str(e)) from None
    sys.stdout.write("\n")
    return 130 if finish is None or finish.reason == "cancelled" else 0
