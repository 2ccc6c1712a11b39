"""Reference labels for real chat templates, derived independently of loratune's renderer.

`marked/<family>.jinja` is a copy of the family's real chat template (from its npm tokenizer package)
into which `{% generation %}...{% endgeneration %}` markers were inserted by hand around exactly what
an assistant must generate: its content as rendered and its end-of-turn token (for Qwen3 the think block
as rendered, for tool calls the call text), never the role header before it nor the newline after it.
Only the markers were added; where a marker could not sit inside an expression, the expression was
split in two (tests/realtok/test_marked_templates.py checks that each marked template renders exactly
the text of the original on every conversation of conversations.py).

`expected_labels` renders a conversation through that marked template with transformers'
`apply_chat_template(..., return_assistant_tokens_mask=True)` and turns the mask into labels: the
token id where the mask is 1, -100 elsewhere.
"""

from __future__ import annotations

from pathlib import Path

IGNORE = -100
MARKED = Path(__file__).parent / "marked"


def marked_template(family: str) -> str:
    """The hand-marked copy of `family`'s real chat template."""
    path = MARKED / f"{family}.jinja"
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in MARKED.glob("*.jinja")))
        raise KeyError(f"no marked template for {family!r}; known: {known}")
    return path.read_text(encoding="utf-8")


def render_marked(tokenizer, messages: list[dict], family: str, tools: list[dict] | None = None,
                  **template_kwargs) -> dict:
    """apply_chat_template through the marked template: {'input_ids': [...], 'assistant_masks': [...]}.

    Raises what the real template raises (jinja2's TemplateError, TypeError) on a conversation it refuses.
    """
    out = tokenizer.apply_chat_template(
        messages, tools=tools, chat_template=marked_template(family), tokenize=True, return_dict=True,
        return_assistant_tokens_mask=True, add_generation_prompt=False, **template_kwargs,
    )
    return {"input_ids": list(out["input_ids"]), "assistant_masks": list(out["assistant_masks"])}


def expected_labels(tokenizer, messages: list[dict], family: str, tools: list[dict] | None = None,
                    **template_kwargs) -> tuple[list[int], list[int]]:
    """(input_ids, labels) of the whole conversation as `family`'s real template renders it.

    `input_ids` are the template's rendering tokenized without added special tokens (every family's
    template writes its own BOS where it has one); `labels` equal `input_ids` on the tokens an assistant
    must generate and are IGNORE (-100) everywhere else. `template_kwargs` go to the template as
    variables (e.g. `date_string` for Llama 3.2, whose template otherwise prints today's date).
    """
    out = render_marked(tokenizer, messages, family, tools, **template_kwargs)
    ids = out["input_ids"]
    labels = [t if m else IGNORE for t, m in zip(ids, out["assistant_masks"], strict=True)]
    return ids, labels


def supervised_spans(ids: list[int], labels: list[int]) -> list[list[int]]:
    """The runs of consecutive supervised token ids, in order (one per assistant turn, normally)."""
    spans: list[list[int]] = []
    prev = False
    for tok, lab in zip(ids, labels, strict=True):
        on = lab != IGNORE
        if on and not prev:
            spans.append([])
        if on:
            spans[-1].append(tok)
        prev = on
    return spans
