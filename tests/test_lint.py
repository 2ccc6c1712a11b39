"""The code stays lint-clean: `ruff check` with the rules of pyproject.toml's [tool.ruff] finds nothing.

.ci/run runs the same check before the tests (a finding fails CI); this test keeps a local `pytest` run
honest too. ruff comes with the dev extra, pinned in constraints.txt.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _ruff(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", "--output-format", "concise", *args],
                          cwd=cwd, capture_output=True, text=True, timeout=120)


def test_ruff_finds_nothing_in_the_repository() -> None:
    out = _ruff(".")
    assert out.returncode == 0, "ruff check found problems (pyproject.toml's [tool.ruff] has the rules):\n" + \
        out.stdout + out.stderr


def test_the_rules_catch_what_they_are_for(tmp_path: Path) -> None:
    # the project's own settings on a file with an unused import, an undefined name and trailing whitespace:
    # each is reported (so a green run above means the rules ran, not that none were selected)
    bad = tmp_path / "bad.py"
    bad.write_text("import os\n\n\ndef f():\n    return missing_name \n", encoding="utf-8")
    out = _ruff("--config", str(ROOT / "pyproject.toml"), bad.name, cwd=tmp_path)
    assert out.returncode == 1, out.stdout + out.stderr
    codes = {line.split(" ")[1] for line in out.stdout.splitlines() if line.startswith(f"{bad.name}:")}
    assert {"F401", "F821", "W291"} <= codes, out.stdout
