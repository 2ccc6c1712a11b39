"""`loratune data preview` for preference data: the two sequences of a sample side by side.

A pair shows its chosen answer on the left and its rejected answer on the right (a KTO sample: the completion,
labelled desirable or undesirable, and the mismatched completion its reference point is estimated from), each
with the shared prompt, supervised text marked as the SFT preview marks it (green on a terminal, or between
⟦ and ⟧), wrapped into two columns of `width` characters.
"""

from __future__ import annotations

from loratune.data.preference import PreferenceSample
from loratune.data.render import IGNORE

GREEN, DIM, RESET = "\x1b[32m", "\x1b[2m", "\x1b[0m"
OPEN, CLOSE = "⟦", "⟧"


def _pieces(ids: list[int], labels: list[int], tokenizer, color: bool) -> list[tuple[str, str]]:
    """(style, text) runs of one sequence: style '' masked, 'sup' supervised (markers inline without color)."""
    runs: list[tuple[bool, list[int]]] = []
    for tok, label in zip(ids, labels):
        sup = label != IGNORE
        if runs and runs[-1][0] == sup:
            runs[-1][1].append(tok)
        else:
            runs.append((sup, [tok]))
    out = []
    for sup, toks in runs:
        text = tokenizer.decode(toks, skip_special_tokens=False, clean_up_tokenization_spaces=False)
        if not color and sup:
            text = f"{OPEN}{text}{CLOSE}"
        out.append(("sup" if sup else "", text))
    return out


def _lines(pieces: list[tuple[str, str]], width: int, color: bool) -> list[str]:
    """The runs wrapped to `width` visible characters per line (at newlines too), styles kept per line."""
    lines: list[str] = []
    current, used = "", 0
    for style, text in pieces:
        code = (GREEN if style else DIM) if color else ""
        chunk = ""
        for ch in text:
            if ch == "\n" or used == width:
                current += (code + chunk + RESET) if color and chunk else chunk
                lines.append(current + " " * (width - used))
                current, used, chunk = "", 0, ""
                if ch == "\n":
                    continue
            chunk += ch
            used += 1
        current += (code + chunk + RESET) if color and chunk else chunk
    lines.append(current + " " * (width - used))
    return lines


def side_by_side(sample: PreferenceSample, tokenizer, color: bool, width: int = 60) -> str:
    """The sample's two sequences as two columns with headers."""
    cut = sample.position_ids.index(0, 1)
    left = _lines(_pieces(sample.input_ids[:cut], sample.labels[:cut], tokenizer, color), width, color)
    right = _lines(_pieces(sample.input_ids[cut:], sample.labels[cut:], tokenizer, color), width, color)
    if sample.desirable is None:
        heads = ("chosen", "rejected")
    else:
        heads = ("completion (" + ("desirable" if sample.desirable else "undesirable") + ")",
                 "mismatched completion (KTO reference point)")
    blank = " " * width
    rows = [f"{heads[0]:<{width}} │ {heads[1]}", f"{'─' * width}─┼─{'─' * width}"]
    for i in range(max(len(left), len(right))):
        rows.append(f"{left[i] if i < len(left) else blank} │ {right[i] if i < len(right) else ''}".rstrip())
    return "\n".join(rows)
