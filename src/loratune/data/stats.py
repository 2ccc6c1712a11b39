"""What the data pipeline did, in numbers: nothing is cut or dropped without being counted here."""

from __future__ import annotations

import statistics
from collections import Counter
from dataclasses import dataclass, field


@dataclass
class DatasetStats:
    """One dataset's journey: records read -> samples after length limits -> samples in the mix."""

    path: str
    format: str
    records: int = 0
    samples: int = 0  # after truncation, chunking and drops (train + eval)
    eval: int = 0  # of those, held out for evaluation
    mixed: int = 0  # training samples after weighting (per epoch)
    cached: bool = False
    outcomes: Counter = field(default_factory=Counter)  # this dataset's records by outcome (see DataStats)
    no_target: int = 0  # records whose rendering supervises no token at all (e.g. no assistant turn)


@dataclass
class DataStats:
    template: str = ""
    datasets: list[DatasetStats] = field(default_factory=list)
    eval_datasets: list[DatasetStats] = field(default_factory=list)
    outcomes: Counter = field(default_factory=Counter)  # ok / truncated / split / too_long / no_supervised
    train_samples: int = 0
    eval_samples: int = 0
    rows: int = 0  # training rows: packed rows, or samples when not packing
    tokens: int = 0  # training tokens (without padding)
    supervised: int = 0  # training tokens that carry loss
    lengths: list[int] = field(default_factory=list, repr=False)  # training sample lengths, before packing
    packing_efficiency: float | None = None  # real tokens / (rows x max_length) when packing

    @property
    def truncated(self) -> int:
        return self.outcomes["truncated"]

    @property
    def dropped(self) -> dict[str, int]:
        return {k: v for k, v in self.outcomes.items() if k in ("too_long", "no_supervised") and v}

    @property
    def supervised_fraction(self) -> float:
        return self.supervised / max(self.tokens, 1)

    def length_summary(self) -> dict[str, float]:
        if not self.lengths:
            return {}
        s = sorted(self.lengths)
        # statistics.median: the mean of the two middle values for an even count (s[n // 2] is the upper one)
        return {"min": s[0], "mean": round(statistics.fmean(s), 1), "median": statistics.median(s),
                "p95": s[min(len(s) - 1, int(0.95 * len(s)))], "max": s[-1]}

    def lines(self) -> list[str]:
        """A human-readable report (used by `loratune data preview` and the training log)."""
        out = [f"template: {self.template}"]
        for d in self.datasets + self.eval_datasets:
            role = "eval" if d in self.eval_datasets else "train"
            out.append(f"{role} dataset {d.path} ({d.format}{', from cache' if d.cached else ''}): {d.records} records"
                       f" -> {d.samples} samples" + (f", {d.eval} held out for eval" if d.eval else "")
                       + (f", {d.mixed} in the training mix" if role == "train" else ""))
        dropped = ", ".join(f"{v} {k.replace('_', ' ')}" for k, v in self.dropped.items()) or "none"
        out.append(f"truncated: {self.truncated}; split into chunks: {self.outcomes['split']}; dropped: {dropped}")
        out.append(f"training: {self.train_samples} samples in {self.rows} rows, {self.tokens} tokens, "
                   f"{self.supervised} supervised ({100 * self.supervised_fraction:.1f}%); eval: {self.eval_samples} samples")
        if self.lengths:
            out.append("sample length: " + ", ".join(f"{k} {v}" for k, v in self.length_summary().items()))
            out.append("length histogram: " + histogram(self.lengths))
        if self.packing_efficiency is not None:
            out.append(f"packing efficiency: {100 * self.packing_efficiency:.1f}% of row slots hold tokens")
        return out


def histogram(values: list[int], bins: int = 8) -> str:
    """A one-line text histogram, e.g. `0-63: 12 | 64-127: 40 | ...`."""
    lo, hi = min(values), max(values)
    width = max(1, -(-(hi - lo + 1) // bins))
    counts = Counter((v - lo) // width for v in values)
    return " | ".join(f"{lo + b * width}-{lo + (b + 1) * width - 1}: {counts[b]}" for b in range(bins) if lo + b * width <= hi)
