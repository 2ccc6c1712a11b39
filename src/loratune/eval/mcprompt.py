"""The text of a multiple-choice prompt and its scored continuations, as lm-evaluation-harness writes them.

Two styles, each lm-evaluation-harness's MMLU task of that kind, so that numbers are comparable with
published ones:

- `letters` (`mmlu`): the choices listed as `A. ...`, the prompt ending in `Answer:`, the continuations
  ` A`, ` B`, ...;
- `cloze` (`mmlu_continuation`): `Question: ...\\nAnswer:` and each choice's own text as the continuation.

A k-shot prompt is the subject's description, then k solved examples from the dev split (question, a
space, the right answer, a blank line), then the question. `encode_pairs` turns (context, continuation)
pairs into token ids exactly as lm-evaluation-harness's `_encode_pair` does: trailing spaces of the context
move to the continuation, the whole string is encoded once and the continuation is what follows the
context's own encoding.
"""

from __future__ import annotations

from collections.abc import Sequence

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


def encode_pairs(tokenizer, ctx: str, conts: Sequence[str]) -> tuple[list[int], list[list[int]]]:
    """(context ids, each continuation's ids) as lm-evaluation-harness's `_encode_pair` tokenizes each
    (context, continuation) pair for a causal model: trailing spaces of the context move to the continuation,
    the whole string is encoded, and the continuation is what follows the context's own encoding. The
    tokenizer adds its special tokens (BOS) unless the text starts with BOS already. One batched call."""
    spaces = len(ctx) - len(ctx.rstrip())
    moved = ctx[len(ctx) - spaces:]
    ctx = ctx[:len(ctx) - spaces]
    special = not (tokenizer.bos_token and ctx.startswith(tokenizer.bos_token))
    ids = tokenizer([ctx, *(ctx + moved + c for c in conts)], add_special_tokens=special).input_ids
    ctx_ids = list(ids[0])
    return ctx_ids, [list(whole[len(ctx_ids):]) for whole in ids[1:]]
