"""Built-in chat templates, as Jinja in the same dialect Hugging Face tokenizers use.

A model that ships its own `chat_template` uses it; these are for base models that have none (and for
the tiny offline models the tests and the quickstart build). Each template renders `messages`
(dicts of role/content) with `bos_token`, `eos_token` and `add_generation_prompt` in scope, exactly as
`tokenizer.apply_chat_template` does, so one rendering path serves both.

`ChatTemplate.stop` is the text that ends an assistant turn: it is supervised in training and is a stop
string for generation.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ChatTemplate:
    """A named Jinja chat template and the text that closes an assistant turn."""

    name: str
    jinja: str
    stop: str  # the end-of-turn text after each assistant message ("{eos}" means the tokenizer's eos)


# System messages for templates without a system role are folded into the first user turn.
_FOLD_SYSTEM = (
    "{% if messages and messages[0]['role'] == 'system' %}"
    "{% set sys = messages[0]['content'] + '\n\n' %}{% set msgs = messages[1:] %}"
    "{% else %}{% set sys = '' %}{% set msgs = messages %}{% endif %}"
)

TEMPLATES: dict[str, ChatTemplate] = {
    "llama3": ChatTemplate(
        "llama3",
        "{{ bos_token }}{% for m in messages %}"
        "<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n{{ m['content'] }}<|eot_id|>"
        "{% endfor %}{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}",
        "<|eot_id|>",
    ),
    "chatml": ChatTemplate(
        "chatml",
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}",
        "<|im_end|>",
    ),
    "mistral": ChatTemplate(
        "mistral",
        _FOLD_SYSTEM + "{{ bos_token }}{% for m in msgs %}"
        "{% if m['role'] == 'user' %}[INST] {{ (sys if loop.first else '') + m['content'] }} [/INST]"
        "{% elif m['role'] == 'assistant' %}{{ m['content'] }}{{ eos_token }}{% endif %}{% endfor %}",
        "{eos}",
    ),
    "gemma": ChatTemplate(
        "gemma",
        _FOLD_SYSTEM + "{{ bos_token }}{% for m in msgs %}"
        "<start_of_turn>{{ 'model' if m['role'] == 'assistant' else 'user' }}\n"
        "{{ (sys if loop.first else '') + m['content'] }}<end_of_turn>\n{% endfor %}"
        "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}",
        "<end_of_turn>",
    ),
}
