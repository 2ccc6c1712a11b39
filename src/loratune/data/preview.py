"""`loratune data preview`: see exactly what the model will be trained on, before training.

Each sample is shown as decoded text with the supervised tokens (those that carry loss) told apart from
the masked ones: green on a terminal (masked text dimmed), or between ⟦ and ⟧ otherwise (a pipe, a
file, NO_COLOR). Packed rows show where one sample ends and the next begins. Then the statistics of
`DataStats`: samples per dataset, lengths, truncated and dropped counts, supervised fraction, packing.
"""

from __future__ import annotations

import os
import sys
from typing import TextIO

from loratune.config import Config
from loratune.data.pipeline import PreparedData, prepare_data
from loratune.data.render import IGNORE
from loratune.data.sample import Sample

GREEN, DIM, CYAN, RESET = "\x1b[32m", "\x1b[2m", "\x1b[36m", "\x1b[0m"
OPEN, CLOSE, BOUNDARY = "⟦", "⟧", "⟪next sample⟫"


def use_color(mode: str, stream: TextIO) -> bool:
    if mode != "auto":
        return mode == "always"
    return stream.isatty() and "NO_COLOR" not in os.environ


def _runs(sample: Sample) -> list[tuple[bool, bool, list[int]]]:
    """(starts a new packed sample, supervised, token ids) runs of one sample or packed row."""
    runs: list[tuple[bool, bool, list[int]]] = []
    for t, (tok, label) in enumerate(zip(sample.input_ids, sample.labels)):
        new = sample.position_ids is not None and t > 0 and sample.position_ids[t] == 0
        sup = label != IGNORE
        if runs and not new and runs[-1][1] == sup:
            runs[-1][2].append(tok)
        else:
            runs.append((new, sup, [tok]))
    return runs


def render_sample(sample: Sample, tokenizer, color: bool) -> str:
    """The decoded text of a sample with supervised text marked."""
    out = []
    for new, sup, ids in _runs(sample):
        if new:
            out.append(f"{CYAN}{BOUNDARY}{RESET}" if color else BOUNDARY)
        text = tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
        if color:
            out.append(f"{GREEN if sup else DIM}{text}{RESET}")
        else:
            out.append(f"{OPEN}{text}{CLOSE}" if sup else text)
    return "".join(out)


def format_preview(data: PreparedData, tokenizer, n: int, color: bool) -> str:
    from loratune.pref.preview import PreferenceSample, side_by_side

    legend = (f"{GREEN}supervised (carries loss){RESET}, {DIM}masked{RESET}" if color
              else f"supervised text is between {OPEN} and {CLOSE}; the rest is masked")
    lines = [f"template: {data.template.name}   legend: {legend}", ""]
    for i, s in enumerate(data.train[:n]):
        sup = sum(1 for x in s.labels if x != IGNORE)
        if isinstance(s, PreferenceSample):  # preference data: its two sequences side by side
            lines += [f"── {'pair' if s.desirable is None else 'completion'} {i + 1} of {len(data.train)}: {len(s)} "
                      f"tokens, {sup} supervised ──", side_by_side(s, tokenizer, color), ""]
            continue
        kind = "packed row" if s.position_ids is not None else "sample"
        lines += [f"── {kind} {i + 1} of {len(data.train)}: {len(s)} tokens, {sup} supervised ──",
                  render_sample(s, tokenizer, color), ""]
    lines += ["statistics:", *("  " + line for line in data.stats.lines())]
    return "\n".join(lines) + "\n"


def preview(cfg: Config, n: int = 3, color: str = "auto", stream: TextIO | None = None) -> PreparedData:
    """Prepare the data as training would and print `n` samples and the statistics."""
    from loratune.model.load import load_tokenizer

    stream = stream or sys.stdout
    tokenizer, info = load_tokenizer(cfg.model)
    if cfg.train.method == "sft":
        data = prepare_data(cfg.data, tokenizer, info, cfg.train.seed, log_stats=False)
    else:  # pairs or KTO completions, shown side by side (loratune.pref.preview)
        from loratune.data.preference import prepare_preference_data

        data = prepare_preference_data(cfg.data, tokenizer, info, cfg.train.seed, cfg.train.method, log_stats=False)
    stream.write(format_preview(data, tokenizer, n, use_color(color, stream)))
    return data
