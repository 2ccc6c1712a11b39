"""The text of a multiple-choice prompt and its scored continuations, as lm-evaluation-harness writes them.

Two styles, each lm-evaluation-harness's MMLU task of that kind, so that numbers are comparable with
published ones:

- `letters` (`mmlu`): the choices listed as `A. ...`, the prompt ending in `Answer:`, the continuations
  ` A`, ` B`, ...;
- `cloze` (`mmlu_continuation`): `Question: ...\\nAnswer:` and each choice's own text as the continuation.

A k-shot prompt is the subject's description, then k solved examples from the dev split (question, a
space, the right answer, a blank line), then the question. `encode_pair` turns (context, continuation)
into token ids exactly as lm-evaluation-harness's `_encode_pair` does: trailing spaces of the context move
to the continuation, the whole string is encoded once and the continuation is what follows the context's
own encoding.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from loratune.eval.mcdata import LETTERS, Question

DESCRIPTIONS = {
    "letters": "The following are multiple choice questions (with answers) about {subject}.\n\n",
    "cloze": "The following are questions (with answers) about {subject}.\n\n",
}
TARGET_DELIMITER = " "
FEWSHOT_DELIMITER = "\n\n"


def question_text(q: Question, style: str) -> str:
    if style == "letters":
        lines = [q.question.strip(), *(f"{LETTERS[i]}. {c}" for i, c in enumerate(q.choices))]
        return "\n".join(lines) + "\nAnswer:"
    return f"Question: {q.question.strip()}\nAnswer:"


def answer_texts(q: Question, style: str) -> list[str]:
    """What each choice is scored as (without the delimiter): its letter, or its text."""
    return [LETTERS[i] for i in range(len(q.choices))] if style == "letters" else list(q.choices)


def context(q: Question, shots: Sequence[Question], style: str, description: str | None) -> str:
    """Description, solved shots, then the question (ending in `Answer:`)."""
    text = (DESCRIPTIONS[style] if description is None else description).replace("{subject}", q.subject.replace("_", " "))
    for s in shots:
        text += question_text(s, style) + TARGET_DELIMITER + answer_texts(s, style)[s.answer] + FEWSHOT_DELIMITER
    return text + question_text(q, style)


def continuations(q: Question, style: str) -> list[str]:
    return [TARGET_DELIMITER + a for a in answer_texts(q, style)]


def encode_pair(encode: Callable[[str], list[int]], ctx: str, continuation: str) -> tuple[list[int], list[int]]:
    """(context ids, continuation ids) as lm-evaluation-harness tokenizes a pair for a causal model."""
    spaces = len(ctx) - len(ctx.rstrip())
    if spaces:
        continuation = ctx[-spaces:] + continuation
        ctx = ctx[:-spaces]
    whole = encode(ctx + continuation)
    ctx_ids = encode(ctx)
    return ctx_ids, whole[len(ctx_ids):]


def text_encoder(tokenizer) -> Callable[[str], list[int]]:
    """Token ids of a text with the tokenizer's own special tokens (BOS), unless the text starts with BOS already."""
    bos = tokenizer.bos_token

    def encode(text: str) -> list[int]:
        special = not (bos and text.startswith(bos))
        return list(tokenizer(text, add_special_tokens=special).input_ids)

    return encode
