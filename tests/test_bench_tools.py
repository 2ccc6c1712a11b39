"""The benchmark's timeline analysis (benchmarks/trace_step.py) on hand-made activities."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))

from trace_step import Activity, idle_gaps, main  # noqa: E402


def test_idle_gaps_between_overlapping_activities() -> None:
    acts = [Activity(0, 10, "a"), Activity(5, 20, "b"), Activity(30, 40, "c"), Activity(41, 50, "d"),
            Activity(45, 47, "e"), Activity(150, 160, "f")]
    gaps = idle_gaps(acts, min_us=5)
    assert [(g, before.name, after.name) for g, before, after in gaps] == [(100, "d", "f"), (10, "b", "c")]
    assert idle_gaps(acts, min_us=1)[-1][0] == 1  # c ends at 40, d starts at 41
    assert idle_gaps([], min_us=1) == []


def test_trace_step_runs_end_to_end_on_the_cpu(tmp_path: Path, capsys) -> None:
    """A smoke run of the script (tiny shape, CPU): it builds, steps, profiles and writes both traces."""
    main(["--shape", "tiny", "--case", "1x32", "--steps", "2", "--device", "cpu",
          "--model-dir", str(tmp_path / "models"), "--out-dir", str(tmp_path / "out")])
    printed = capsys.readouterr().out
    assert "== eager: step" in printed and "== graphed: step" in printed
    assert {p.name for p in (tmp_path / "out").iterdir()} == {"trace_eager.json.gz", "trace_graphed.json.gz"}
