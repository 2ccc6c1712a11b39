"""An Ollama Modelfile for a GGUF export: FROM, the chat template as a Go template, stop tokens, parameters.

Ollama renders prompts with Go's text/template over `.Messages` (role, content), not with the Jinja
template the model was trained with. So the trained template is *measured*, not looked up by name: it is
rendered (with the same renderer as training) on probe conversations, and the pieces around each message are
read off (what precedes and follows a system, user and assistant message, the generation prompt, the prefix
of every conversation). Two layouts are recognised: a system message with a turn of its own (Llama 3,
ChatML, Phi-3, Zephyr) and a system message folded into the first user turn (Mistral, Gemma, Alpaca's and
Guanaco's, with the separator measured too). The recovered layout is then checked: rendered by its Python
twin (`TurnFormat.render`, the same pieces the Go template is written from) it must equal the Jinja
rendering of multi-turn conversations with and without a system message. A template that passes becomes
the TEMPLATE; one that does not (a template that rewrites contents, numbers turns, injects dates or tools)
gets no TEMPLATE line and a comment saying so: Ollama then falls back to the chat template stored in the
GGUF where it recognises it, and `loratune export` prints a warning.

The prefix of a conversation loses the BOS token text when the GGUF adds BOS itself (llama.cpp adds it at
tokenization, as `tokenizer.ggml.add_bos_token` says), so it is not doubled.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

S, U, A = "loratune-system-7c1", "loratune-user-4e9", "loratune-assistant-2b5"
U2, A2, U3 = "loratune-user-second-91d", "loratune-assistant-second-03f", "loratune-user-third-5aa"


@dataclass(frozen=True)
class TurnFormat:
    """The pieces of a chat template that renders each message on its own (system in a turn or folded)."""

    head: str  # before the first message
    user: tuple[str, str]
    assistant: tuple[str, str]
    generation: str  # after the last message when a reply is wanted
    system: tuple[str, str] | None  # a turn of its own, or None: folded into the first user message
    fold_sep: str = ""  # between the system text and the first user message when folded

    def render(self, messages: list[dict], add_generation_prompt: bool) -> str:
        out, pending = [self.head], None
        for m in messages:
            if m["role"] == "system":
                if self.system is None:
                    pending = m["content"]
                else:
                    out += [self.system[0], m["content"], self.system[1]]
            elif m["role"] == "user":
                text = m["content"] if pending is None else pending + self.fold_sep + m["content"]
                pending = None
                out += [self.user[0], text, self.user[1]]
            else:
                out += [self.assistant[0], m["content"], self.assistant[1]]
        if add_generation_prompt:
            out.append(self.generation)
        return "".join(out)

    def go_template(self, strip_prefix: str = "") -> str:
        """The same layout as an Ollama (Go text/template) TEMPLATE."""
        head = self.head[len(strip_prefix):] if strip_prefix and self.head.startswith(strip_prefix) else self.head
        lit = _go_literal
        user = f"{lit(self.user[0])}{{{{ .Content }}}}{lit(self.user[1])}"
        if self.system is None:
            user = (f"{lit(self.user[0])}{{{{ if $sys }}}}{{{{ $sys }}}}{lit(self.fold_sep)}{{{{ $sys = \"\" }}}}"
                    f"{{{{ end }}}}{{{{ .Content }}}}{lit(self.user[1])}")
            system = "{{ $sys = .Content }}"
            start = '{{ $sys := "" }}'
        else:
            system = f"{lit(self.system[0])}{{{{ .Content }}}}{lit(self.system[1])}"
            start = ""
        assistant = f"{lit(self.assistant[0])}{{{{ .Content }}}}{lit(self.assistant[1])}"
        return (f"{start}{lit(head)}{{{{ range .Messages }}}}{{{{ if eq .Role \"system\" }}}}{system}"
                f"{{{{ else if eq .Role \"user\" }}}}{user}{{{{ else if eq .Role \"assistant\" }}}}{assistant}"
                f"{{{{ end }}}}{{{{ end }}}}{lit(self.generation)}")


def _go_literal(text: str) -> str:
    """Literal text inside a Go template (a `{{` in it would open an action)."""
    return text.replace("{{", '{{ "{{" }}')


def _split(text: str, marker: str) -> tuple[str, str] | None:
    if text.count(marker) != 1:
        return None
    before, after = text.split(marker)
    return before, after


def measure(render) -> TurnFormat | None:
    """The TurnFormat of a template, from `render(messages, add_generation_prompt) -> str`; None when the
    template does not render each message on its own in a way the checks confirm."""
    head = render([], False)
    one = render([{"role": "user", "content": U}], False)
    if not one.startswith(head):
        return None
    user = _split(one[len(head):], U)
    two = render([{"role": "user", "content": U}, {"role": "assistant", "content": A}], False)
    gen = render([{"role": "user", "content": U}], True)
    if user is None or not two.startswith(one) or not gen.startswith(one):
        return None
    assistant = _split(two[len(one):], A)
    if assistant is None:
        return None
    with_system = render([{"role": "system", "content": S}, {"role": "user", "content": U}], False)
    user_part = one[len(head):]
    system, sep = None, ""
    if with_system.startswith(head) and with_system.endswith(user_part):
        system = _split(with_system[len(head):len(with_system) - len(user_part)], S)
    if system is None:  # folded: head + user prefix + S + sep + U + user suffix
        start = head + user[0] + S
        end = U + user[1]
        if not (with_system.startswith(start) and with_system.endswith(end)) or len(with_system) < len(start + end):
            return None
        sep = with_system[len(start):len(with_system) - len(end)]
    fmt = TurnFormat(head, user, assistant, gen[len(one):], system, sep)
    return fmt if _confirmed(fmt, render) else None


def _confirmed(fmt: TurnFormat, render) -> bool:
    chats = [
        [{"role": "user", "content": U}, {"role": "assistant", "content": A}, {"role": "user", "content": U2},
         {"role": "assistant", "content": A2}, {"role": "user", "content": U3}],
        [{"role": "system", "content": S}, {"role": "user", "content": U}, {"role": "assistant", "content": A},
         {"role": "user", "content": U2}],
    ]
    return all(fmt.render(c, g) == render(c, g) for c in chats for g in (False, True))


def modelfile(gguf_file: str, *, fmt: TurnFormat | None, bos_text: str | None, add_bos: bool, stops: list[str],
              num_ctx: int, source: str, parameters: dict[str, float] | None = None) -> str:
    """The Modelfile text for `gguf_file` (a path relative to the Modelfile's folder)."""
    lines = [f"# Ollama Modelfile written by `loratune export` for {source}",
             f"# create the model: ollama create NAME -f {Path('Modelfile')}", f"FROM ./{gguf_file}"]
    if fmt is not None:
        template = fmt.go_template(strip_prefix=bos_text if add_bos and bos_text else "")
        if '"""' in template:
            raise ValueError('the chat template holds """, which a Modelfile TEMPLATE cannot quote')
        lines.append(f'TEMPLATE """{template}"""')
    else:
        lines.append("# no TEMPLATE: the run's chat template does not reduce to per-message pieces (checked on "
                     "probe conversations); Ollama uses the chat template stored in the GGUF if it knows it")
    for stop in dict.fromkeys(s for s in stops if s):
        lines.append(f"PARAMETER stop {json.dumps(stop, ensure_ascii=False)}")
    lines.append(f"PARAMETER num_ctx {int(num_ctx)}")
    for key, value in (parameters or {}).items():
        lines.append(f"PARAMETER {key} {value:g}")
    return "\n".join(lines) + "\n"
