"""Built-in chat templates, as Jinja in the same dialect Hugging Face tokenizers use.

A model that ships its own `chat_template` uses it; these are for base models that have none (and for
the tiny offline models the tests and the quickstart build). Each template renders `messages`
(dicts of role/content) with `bos_token`, `eos_token` and `add_generation_prompt` in scope, exactly as
`tokenizer.apply_chat_template` does, so one rendering path serves both.

`ChatTemplate.stop` is the text that ends an assistant turn: it is supervised in training and is a stop
string for generation.

`resolve_template` turns `data.template` into a `ChatTemplate`: `auto` is the tokenizer's own template
(matched to a built-in when identical, else its stop text is found by rendering a probe conversation),
chatml when it has none; a built-in name; or a path to a .jinja file.

None of these templates renders BOS unless the model family always starts with one in its template
(llama3, mistral, gemma); the renderer (`loratune.data.render`) adds BOS when the tokenizer adds one to
plain text and the template did not, so every sequence has exactly one.
"""

from __future__ import annotations

import difflib
import logging
from dataclasses import dataclass, field, replace
from pathlib import Path

from loratune.errors import ConfigError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ChatTemplate:
    """A named Jinja chat template and the text that closes an assistant turn."""

    name: str
    jinja: str
    stop: str  # the end-of-turn text after each assistant message ("{eos}" means the tokenizer's eos)
    variables: dict = field(default_factory=dict)  # extra template variables (data.template_variables)

    @property
    def label(self) -> str:
        """How messages name the template: its name, or the tokenizer's own when it came with the model."""
        return "the tokenizer's chat template" if self.name in ("tokenizer", "saved") else f"chat template {self.name!r}"

    def stop_text(self, eos_token: str) -> str:
        """The literal end-of-turn text for a tokenizer whose eos is `eos_token`."""
        return eos_token if self.stop == EOS else self.stop


EOS = "{eos}"


# Tools and tool calls, one plain convention for base models: the tool schemas become text at the end of
# the system prompt (a system message of their own when there is none), and each tool call an assistant
# makes follows its text as <tool_call>{"name": ..., "arguments": {...}}</tool_call>. `chat` is `messages`
# with that system text in place; with no tools it is `messages` itself, so the rendering is unchanged.
_TOOLS = (
    "{% set chat = messages %}{% if tools %}"
    "{% set ns = namespace(text='You can call these functions. To call one, reply with <tool_call>{\"name\": "
    "<function name>, \"arguments\": <a JSON object>}</tool_call>.\n<tools>') %}"
    "{% for t in tools %}{% set ns.text = ns.text + '\n' + (t | tojson) %}{% endfor %}"
    "{% set ns.text = ns.text + '\n</tools>' %}"
    "{% if messages and messages[0]['role'] == 'system' %}"
    "{% set chat = [{'role': 'system', 'content': messages[0]['content'] + '\n\n' + ns.text}] + messages[1:] %}"
    "{% else %}{% set chat = [{'role': 'system', 'content': ns.text}] + messages %}{% endif %}{% endif %}"
)
# reply(m): a message's text followed by its tool calls (assistant messages carry them).
_REPLY = (
    "{% macro reply(m) %}{{ m['content'] }}{% for c in m['tool_calls'] or [] %}"
    "{{ '\n' if m['content'] or not loop.first else '' }}<tool_call>{{ {'name': c['function']['name'], "
    "'arguments': c['function']['arguments']} | tojson }}</tool_call>{% endfor %}{% endmacro %}"
)
# System messages for templates without a system role are folded into the first user turn (or, when the
# conversation opens with an assistant turn, given a user turn of their own); later ones become user turns.
def _fold_system(sep: str = "\n\n") -> str:
    """Jinja setting `sys` (the system text + `sep`, or '') and `msgs` (the rest of the conversation)."""
    return (_TOOLS + _REPLY + "{% if chat and chat[0]['role'] == 'system' %}"
            f"{{% set sys = chat[0]['content'] + '{sep}' %}}{{% set msgs = chat[1:] %}}"
            "{% else %}{% set sys = '' %}{% set msgs = chat %}{% endif %}")


_FOLD_SYSTEM = _fold_system()
_SYS_OWN_TURN = "{% set own = sys and (not msgs or msgs[0]['role'] == 'assistant') %}"

TEMPLATES: dict[str, ChatTemplate] = {
    "llama3": ChatTemplate(
        "llama3",
        _TOOLS + _REPLY + "{{ bos_token }}{% for m in chat %}"
        "<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n{{ reply(m) }}<|eot_id|>"
        "{% endfor %}{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}",
        "<|eot_id|>",
    ),
    "chatml": ChatTemplate(
        "chatml",
        _TOOLS + _REPLY + "{% for m in chat %}<|im_start|>{{ m['role'] }}\n{{ reply(m) }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}",
        "<|im_end|>",
    ),
    "mistral": ChatTemplate(
        "mistral",
        _FOLD_SYSTEM + _SYS_OWN_TURN + "{{ bos_token }}{% if own %}[INST] {{ sys | trim }} [/INST]{% endif %}"
        "{% for m in msgs %}"
        "{% if m['role'] == 'assistant' %}{{ reply(m) }}{{ eos_token }}"
        "{% else %}[INST] {{ sys if loop.first and not own else '' }}{{ m['content'] }} [/INST]{% endif %}{% endfor %}",
        "{eos}",
    ),
    "gemma": ChatTemplate(
        "gemma",
        _FOLD_SYSTEM + _SYS_OWN_TURN + "{{ bos_token }}"
        "{% if own %}<start_of_turn>user\n{{ sys | trim }}<end_of_turn>\n{% endif %}{% for m in msgs %}"
        "<start_of_turn>{{ 'model' if m['role'] == 'assistant' else 'user' }}\n"
        "{{ sys if loop.first and not own else '' }}{{ reply(m) }}<end_of_turn>\n{% endfor %}"
        "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}",
        "<end_of_turn>",
    ),
    "phi3": ChatTemplate(
        "phi3",
        _TOOLS + _REPLY + "{% for m in chat %}<|{{ m['role'] }}|>\n{{ reply(m) }}<|end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>\n{% endif %}",
        "<|end|>",
    ),
    "zephyr": ChatTemplate(
        "zephyr",
        _TOOLS + _REPLY + "{% for m in chat %}<|{{ m['role'] }}|>\n{{ reply(m) }}{{ eos_token }}\n{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>\n{% endif %}",
        EOS,
    ),
    # No markup: contents concatenated, each assistant reply closed by eos (qlora.py's source + target + eos).
    "plain": ChatTemplate(
        "plain",
        _TOOLS + _REPLY + "{% for m in chat %}{{ reply(m) }}{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}"
        "{% endfor %}",
        EOS,
    ),
    # Stanford Alpaca's prompt, extended to several turns; the response ends with eos as in its training.
    "alpaca": ChatTemplate(
        "alpaca",
        _fold_system("")
        + "{{ sys or 'Below is an instruction that describes a task. Write a response that appropriately "
          "completes the request.' }}\n\n{% for m in msgs %}"
          "{% if m['role'] == 'assistant' %}{{ reply(m) }}{{ eos_token }}\n\n"
          "{% else %}### Instruction:\n{{ m['content'] }}\n\n### Response:\n{% endif %}{% endfor %}",
        EOS,
    ),
    # Vicuna v1.1 (FastChat): "SYSTEM USER: q ASSISTANT: a</s>USER: ..."
    "vicuna": ChatTemplate(
        "vicuna",
        _fold_system("")
        + "{{ sys or 'A chat between a curious user and an artificial intelligence assistant. The assistant gives "
          "helpful, detailed, and polite answers to the user\\'s questions.' }} {% for m in msgs %}"
          "{% if m['role'] == 'assistant' %} {{ reply(m) }}{{ eos_token }}"
          "{% else %}USER: {{ m['content'] }} ASSISTANT:{% endif %}{% endfor %}",
        EOS,
    ),
    # The OASST1 text form the QLoRA paper trained Guanaco on; qlora.py appended eos to every target.
    "guanaco": ChatTemplate(
        "guanaco",
        _fold_system("")
        + "{% if sys %}{{ sys }}\n{% endif %}{% for m in msgs %}"
          "{% if m['role'] == 'assistant' %}### Assistant: {{ reply(m) }}{{ eos_token }}"
          "{% else %}### Human: {{ m['content'] }}{% endif %}{% endfor %}"
          "{% if add_generation_prompt %}### Assistant:{% endif %}",
        EOS,
    ),
}

# The markup tokens of each built-in template that are meant to be one token each (plain-text markers such as
# "### Human:" are text by design and not listed).
_MARKUP: dict[str, tuple[str, ...]] = {
    "llama3": ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
    "chatml": ("<|im_start|>", "<|im_end|>"),
    "gemma": ("<start_of_turn>", "<end_of_turn>"),
    "phi3": ("<|user|>", "<|assistant|>", "<|end|>"),
}

# A probe conversation: rendering it shows what a template writes after an assistant message.
_PROBE_REPLY = "loratune probe reply 7f3a"
_PROBE = [{"role": "user", "content": "loratune probe question"}, {"role": "assistant", "content": _PROBE_REPLY}]


def render_text(tokenizer, jinja: str, messages: list[dict], add_generation_prompt: bool = False,
                tools: list[dict] | None = None, variables: dict | None = None) -> str:
    """Render `messages` with `jinja` exactly as `tokenizer.apply_chat_template(tokenize=False, **variables)`
    does (same renderer, same special-token variables), also for an empty list (the prefix of a first turn)."""
    from transformers.utils.chat_template_utils import render_jinja_template

    rendered, _ = render_jinja_template([messages], tools=tools, chat_template=jinja,
                                        add_generation_prompt=add_generation_prompt,
                                        **{**(variables or {}), **tokenizer.special_tokens_map})
    return rendered[0]


def marker_tokens(tokenizer) -> list[str]:
    """Every token text the tokenizer treats as one unit: its special tokens and its added vocabulary
    (Llama 3's `<|eot_id|>` is an added token but not a named special token in the original release)."""
    added = getattr(tokenizer, "get_added_vocab", dict)()
    return [t for t in dict.fromkeys([*tokenizer.all_special_tokens, *added]) if t]


def infer_stop(tokenizer, jinja: str, name: str, variables: dict | None = None) -> str:
    """The end-of-turn text of an arbitrary template: what follows an assistant reply, up to and including the
    first marker token (special or added, e.g. `<|im_end|>` before a newline); the whole suffix, stripped,
    if it contains no marker token."""
    try:
        text = render_text(tokenizer, jinja, _PROBE, variables=variables)
    except Exception as e:  # a template error: show the template's own message
        raise ConfigError(f"chat template {name!r} cannot render a user/assistant conversation: {e}") from None
    at = text.rfind(_PROBE_REPLY)
    if at < 0:
        raise ConfigError(f"chat template {name!r} does not write the assistant's content into the text")
    after = text[at + len(_PROBE_REPLY):]
    hits = [(after.find(t), -len(t), t) for t in marker_tokens(tokenizer) if after.find(t) >= 0]
    stop = after[:min(hits)[0] + len(min(hits)[2])] if hits else after.rstrip()
    if not stop.strip():
        raise ConfigError(f"chat template {name!r} writes nothing after an assistant message, so the model could "
                          "never learn to stop; end assistant turns with {{ eos_token }} or an end-of-turn token")
    return EOS if stop == tokenizer.eos_token else stop


def splits_into_pieces(tokenizer, template: ChatTemplate) -> list[str]:
    """The markup tokens of a built-in template that this tokenizer would cut into several pieces."""
    marks = _MARKUP.get(template.name, ())
    return [m for m in marks if len(tokenizer.encode(m, add_special_tokens=False)) != 1]


def _fallback(tokenizer) -> ChatTemplate:
    """The template for a tokenizer without one: chatml when its markers are single tokens of this vocabulary,
    else guanaco's plain-text markers (never markers that would be cut into pieces)."""
    chosen = TEMPLATES["chatml"] if not splits_into_pieces(tokenizer, TEMPLATES["chatml"]) else TEMPLATES["guanaco"]
    how = ("its <|im_start|>/<|im_end|> markers are tokens of this vocabulary" if chosen.name == "chatml" else
           f"plain-text '### Human:'/'### Assistant:' markers, each answer closed by eos {tokenizer.eos_token!r}")
    log.info("the tokenizer has no chat template: using the built-in %r template (%s); set data.template to choose "
             "another", chosen.name, how)
    return chosen


def _own_template(tokenizer) -> str | None:
    tpl = getattr(tokenizer, "chat_template", None)
    if isinstance(tpl, dict):  # several named templates: the default one is for chat
        tpl = tpl.get("default")
    return tpl or None


def resolve_template(spec: str, tokenizer, variables: dict | None = None) -> ChatTemplate:
    """`data.template` (and `data.template_variables`) -> the `ChatTemplate` to render with (see the module
    docstring)."""
    template = _resolve(spec, tokenizer, variables or {})
    return replace(template, variables=dict(variables)) if variables else template


def _resolve(spec: str, tokenizer, variables: dict) -> ChatTemplate:
    if spec in TEMPLATES:
        chosen = TEMPLATES[spec]
        split = splits_into_pieces(tokenizer, chosen)
        if split:
            log.warning("data.template %r: this tokenizer cuts its markers %s into several tokens each; a model "
                        "learns them, but a template whose markers are tokens of the vocabulary is better",
                        spec, ", ".join(split))
        return chosen
    if spec == "auto":
        own = _own_template(tokenizer)
        if own is None:
            return _fallback(tokenizer)
        for t in TEMPLATES.values():
            if t.jinja == own:
                return t
        return ChatTemplate("tokenizer", own, infer_stop(tokenizer, own, "the tokenizer's", variables))
    path = Path(spec)
    if path.suffix not in (".jinja", ".j2", ".jinja2") and not path.is_file():
        close = difflib.get_close_matches(spec.lower().replace("-", "").replace("_", ""), TEMPLATES, n=1, cutoff=0.6)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise ConfigError(f"config key 'data.template': got {spec!r}; {hint}expected 'auto', one of "
                          f"{', '.join(TEMPLATES)}, or a path to a .jinja file")
    if not path.is_file():
        raise ConfigError(f"config key 'data.template': template file not found: {spec}")
    jinja = path.read_text(encoding="utf-8")
    return ChatTemplate(path.stem, jinja, infer_stop(tokenizer, jinja, str(path), variables))
