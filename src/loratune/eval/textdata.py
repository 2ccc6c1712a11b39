"""Prompts (and references) for generation and judging, read in any data format training reads.

The records go through training's own readers and format normalisation (`loratune.data.readers`,
`loratune.data.formats`), so a file that trains also evaluates, with the same row-level errors. A
record becomes a prompt conversation and, for generate-and-score, a reference: the last assistant
message is the reference and everything before it the prompt. For the judge, a record is the prompt up
to its last user message (an answer after it, if any, is ignored); a record holding only a prompt
(`prompt`, or `instruction` with an optional `input`) is a prompt too.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from loratune.config import ColumnsConfig
from loratune.data.formats import Normaliser
from loratune.data.readers import Record, dataset_files, iter_file, iter_hub, looks_local
from loratune.errors import DataError


@dataclass(frozen=True)
class TextItem:
    """A prompt conversation, its reference answer (None for judge prompts) and where it came from."""

    id: str
    messages: tuple[dict, ...]
    reference: str | None
    source: str
    row: int

    @property
    def last_user(self) -> str:
        return next(m["content"] for m in reversed(self.messages) if m["role"] == "user")


def _records(path: str, split: str) -> tuple[Iterator[Record], list[Path]]:
    if Path(path).exists():
        files = dataset_files(path)
        return itertools.chain.from_iterable(iter_file(f) for f in files), files
    if looks_local(path):
        raise DataError(f"{path}: no such file or folder")
    return iter_hub(path, split, streaming=False), []


def _fail(rec: Record, what: str) -> DataError:
    return DataError(f"{rec.source}: row {rec.row}: {what}")


def _bare_prompt(rec: Record, columns: ColumnsConfig) -> str | None:
    """The prompt of a record that holds only one (`prompt` without `completion`, `instruction` without `output`):
    a judge's prompt file needs no answers."""
    data = rec.data
    if not isinstance(data, dict):
        return None
    prompt, completion = columns.prompt or "prompt", columns.completion or "completion"
    instruction, output, extra = columns.instruction or "instruction", columns.output or "output", columns.input or "input"
    if isinstance(data.get(prompt), str) and data[prompt].strip() and completion not in data:
        return data[prompt]
    if isinstance(data.get(instruction), str) and data[instruction].strip() and output not in data:
        more = data.get(extra)
        return data[instruction] + (f"\n\n{more}" if isinstance(more, str) and more.strip() else "")
    return None


def read_items(path: str, *, fmt: str, columns: ColumnsConfig, split: str = "test", system: str | None = None,
               limit: int = 0, with_reference: bool) -> tuple[list[TextItem], list[Path]]:
    """The items of a prompt file (the first `limit`), and the local files read."""
    records, files = _records(path, split)
    normalise = Normaliser(fmt, columns, system)
    items: list[TextItem] = []
    for rec in records:
        if limit and len(items) >= limit:
            break
        bare = None if with_reference or fmt != "auto" else _bare_prompt(rec, columns)
        if bare is not None:
            user = [{"role": "user", "content": bare}]
            items.append(TextItem(str(len(items)), tuple(([{"role": "system", "content": system}] if system else []) + user),
                                  None, rec.source, rec.row))
            continue
        ex = normalise(rec)
        if not ex.messages:
            raise _fail(rec, "plain text; expected a conversation or a prompt/answer pair (a reference answer for "
                             "generate, a prompt for the judge)")
        messages = list(ex.messages)
        reference = None
        if with_reference:
            if messages[-1]["role"] != "assistant":
                raise _fail(rec, "no reference answer: expected the record to end with an assistant message (the "
                                 "reference), after the prompt")
            reference = messages.pop()["content"]
        else:
            while messages and messages[-1]["role"] != "user":
                messages.pop()
        if not any(m["role"] == "user" for m in messages):
            raise _fail(rec, "no user message to answer; expected a prompt")
        items.append(TextItem(str(len(items)), tuple(messages), reference, rec.source, rec.row))
    if not items:
        raise DataError(f"{path}: no prompts found")
    return items, files


def question_text(item: TextItem) -> str:
    """The prompt as plain text for a judge: the user message alone, or the conversation turn by turn."""
    turns = [m for m in item.messages if m["role"] in ("system", "user", "assistant")]
    if len(turns) == 1:
        return turns[0]["content"]
    return "\n\n".join(f"{m['role'].capitalize()}: {m['content']}" for m in turns)
