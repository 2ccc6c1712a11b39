"""The benchmark's timeline analysis (benchmarks/trace_step.py): the idle gaps and the figures it reports.

`idle_gaps` and `report` are checked on hand-made GPU timelines whose figures are worked out here by
hand. The script as a whole runs on the CPU (tiny shape), and what its chrome traces record is checked
against what one training step must contain.
"""

from __future__ import annotations

import gzip
import json
import re
import sys
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))

from trace_step import Activity, idle_gaps, main, report  # noqa: E402


def test_idle_gaps_between_overlapping_activities() -> None:
    acts = [Activity(0, 10, "a"), Activity(5, 20, "b"), Activity(30, 40, "c"), Activity(41, 50, "d"),
            Activity(45, 47, "e"), Activity(150, 160, "f")]
    gaps = idle_gaps(acts, min_us=5)
    # b covers a's end (20 > 10) and e lies inside d: the idle stretches are 20-30 and 50-150, largest first
    assert [(g, before.name, after.name) for g, before, after in gaps] == [(100, "d", "f"), (10, "b", "c")]
    assert [g for g, _, _ in idle_gaps(acts, min_us=1)] == [100, 10, 1]  # c ends at 40, d starts at 41
    assert idle_gaps(acts, min_us=101) == []
    assert idle_gaps(list(reversed(acts)), min_us=5) == gaps  # the input order does not matter
    assert idle_gaps([], min_us=1) == []


# A GPU timeline in microseconds: a and b overlap (two streams), then gaps of 10, 100, 1,000 and 12,000 us.
TIMELINE = [(0, 1000, "a"), (500, 3000, "b"), (3010, 4000, "c"), (4100, 5000, "d"), (6000, 9000, "e"),
            (21000, 22000, "f")]
GAPS_US = [12000, 1000, 100, 10]  # f after e, e after d, d after c, c after b


class FakeProfile:
    """What `report` reads of a torch profiler: its events (GPU ones among host ones) and the chrome trace."""

    def __init__(self, cuda: list[tuple[float, float, str]]) -> None:
        def event(start: float, end: float, name: str, device: torch.autograd.DeviceType) -> SimpleNamespace:
            return SimpleNamespace(device_type=device, time_range=SimpleNamespace(start=start, end=end), name=name)

        self._events = [event(*c, torch.autograd.DeviceType.CUDA) for c in cuda]
        self._events.append(event(-500, 30000, "host op", torch.autograd.DeviceType.CPU))  # not a GPU activity
        self.trace = {"traceEvents": [{"name": name, "ts": s, "dur": e - s} for s, e, name in cuda]}

    def events(self) -> list[SimpleNamespace]:
        return self._events

    def export_chrome_trace(self, path: str) -> None:
        Path(path).write_text(json.dumps(self.trace), encoding="utf-8")


def test_report_figures_of_a_gpu_timeline(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    prof = FakeProfile(TIMELINE)
    report("graphed", prof, wall_s=0.0255, out_dir=tmp_path)
    text = capsys.readouterr().out

    busy_us = sum(end - start for start, end, _ in TIMELINE)  # overlapping activities count twice
    assert busy_us == 9390
    head = re.search(r"== graphed: step ([\d.]+) ms wall, (\d+) GPU activities, ([\d.]+) ms busy, "
                     r"first-to-last ([\d.]+) ms, idle inside ([\d.]+) ms in (\d+) gaps >= 5 us", text)
    assert head is not None, text
    wall, n, busy, span, idle, n_gaps = (float(x) for x in head.groups())
    assert (wall, n, busy, span) == (25.5, 6, 9.4, 22.0)  # the host event is not counted
    assert (idle, n_gaps) == (round(sum(GAPS_US) / 1e3, 1), 4) == (13.1, 4)

    by_size = {int(size): (int(count), float(ms)) for size, count, ms in
               re.findall(r"gaps >= +(\d+) us: +(\d+), +([\d.]+) ms", text)}
    expected = {size: [g for g in GAPS_US if g >= size] for size in (5, 20, 100, 1000, 10000)}
    assert by_size == {size: (len(gs), round(sum(gs) / 1e3, 1)) for size, gs in expected.items()}
    assert by_size[1000] == (2, 13.0) and by_size[10000] == (1, 12.0)

    largest = [(float(ms), before, after) for ms, before, after in
               re.findall(r"([\d.]+) ms idle after '(\w+)' before '(\w+)'", text)]
    assert largest == [(12.0, "e", "f"), (1.0, "d", "e"), (0.1, "c", "d"), (0.01, "b", "c")]

    assert sorted(p.name for p in tmp_path.iterdir()) == ["trace_graphed.json.gz"]  # the plain .json is removed
    with gzip.open(tmp_path / "trace_graphed.json.gz", "rt", encoding="utf-8") as f:
        assert json.load(f) == prof.trace


def _summary(text: str, name: str) -> dict[str, float]:
    m = re.search(rf"== {name}: step ([\d.]+) ms wall, (\d+) GPU activities, ([\d.]+) ms busy, "
                  rf"first-to-last ([\d.]+) ms, idle inside ([\d.]+) ms in (\d+) gaps", text)
    assert m is not None, text
    return dict(zip(("wall_ms", "activities", "busy_ms", "span_ms", "idle_ms", "gaps"), map(float, m.groups())))


def test_trace_step_end_to_end_on_the_cpu(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The script on the tiny shape (2 layers x 7 adapted linears, NF4): each traced step is one real training
    step (forward, checkpoint recompute, backward, optimizer step), timed and written as a chrome trace."""
    main(["--shape", "tiny", "--case", "1x32", "--steps", "2", "--device", "cpu", "--variants", "decoder,eager,hf",
          "--model-dir", str(tmp_path / "models"), "--out-dir", str(tmp_path / "out")])
    text = capsys.readouterr().out
    assert re.findall(r"graph replays: (\d+), captured: (\w+)", text) == [("0", "False")] * 3  # no graphs on the CPU
    assert {p.name for p in (tmp_path / "out").iterdir()} == {f"trace_{n}.json.gz" for n in ("decoder", "eager", "hf")}

    for name in ("decoder", "eager", "hf"):
        figures = _summary(text, name)
        assert figures["wall_ms"] > 0
        # on the CPU there is no GPU timeline: nothing busy, no span, no gaps
        assert {k: v for k, v in figures.items() if k != "wall_ms"} == dict.fromkeys(
            ("activities", "busy_ms", "span_ms", "idle_ms", "gaps"), 0.0)

        with gzip.open(tmp_path / "out" / f"trace_{name}.json.gz", "rt", encoding="utf-8") as f:
            events = json.load(f)["traceEvents"]
        ops = [e for e in events if e.get("cat") == "cpu_op"]
        counts = Counter(e["name"] for e in ops)
        # 14 NF4 linears, each run in the forward and again in checkpointing's recompute: the traced step
        # runs in train mode with activation checkpointing (run 10's trace, in eval mode, had neither)
        if name == "hf":  # the transformers path's NF4 linears go through bitsandbytes' own op (stock peft)
            assert counts["bitsandbytes::gemm_4bit"] == 2 * 2 * 7
        assert counts["_ChunkedLinearCEBackward"] == 1  # the loss's backward, once per step
        annotations = Counter(e["name"] for e in events if e.get("cat") == "user_annotation")
        assert annotations["Optimizer.step#AdamW.step"] == 1 and annotations["Optimizer.zero_grad#AdamW.zero_grad"] == 1
        # the recorded operations lie inside the step the script timed
        span_ms = (max(e["ts"] + e["dur"] for e in ops) - min(e["ts"] for e in ops)) / 1e3
        assert 0.3 * figures["wall_ms"] <= span_ms <= figures["wall_ms"] + 0.1
