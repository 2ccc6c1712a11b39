"""Fixtures of the UI tests: a workspace, a running `loratune ui`, and a headless Chromium driven by Playwright.

The browser is Debian's `chromium` (/usr/bin/chromium, installed by .ci/run), launched by path: Playwright's
own browser download is never used. Without it the browser tests skip with the reason, except in CI
(`CI` set), where a missing browser is a failure.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from loratune.ui.jobs import Jobs
from loratune.ui.paths import Workspace

ROOT = Path(__file__).resolve().parents[2]
CHROMIUM = os.environ.get("LORATUNE_CHROMIUM", "/usr/bin/chromium")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def workspace(tmp_path: Path) -> Path:
    ws = tmp_path / "ws"
    (ws / "data").mkdir(parents=True)
    shutil.copy(ROOT / "examples" / "data" / "quickstart.jsonl", ws / "data" / "quickstart.jsonl")
    return ws


def start_ui(ws: Path, *extra: str, env: dict[str, str] | None = None) -> tuple[subprocess.Popen, str]:
    """`loratune ui` on a free port; `env` is added to the server's environment (its jobs inherit it)."""
    port = free_port()
    with open(ws.parent / "ui.log", "ab") as log:  # a file, not a pipe nobody reads (it would block the server)
        proc = subprocess.Popen([sys.executable, "-m", "loratune.cli", "ui", "--workspace", str(ws), "--port",
                                 str(port), *extra], stdout=log, stderr=subprocess.STDOUT,
                                env={**os.environ, **(env or {})})
    url = f"http://127.0.0.1:{port}/"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"loratune ui exited ({proc.returncode}):\n{(ws.parent / 'ui.log').read_text()}")
        try:
            urllib.request.urlopen(url, timeout=2)
            return proc, url
        except OSError:
            time.sleep(0.5)
    proc.kill()
    raise RuntimeError("loratune ui did not answer within 120 s")


@pytest.fixture
def ui_env() -> dict[str, str]:
    """Extra environment of the UI server and the jobs it starts (none unless a test overrides this fixture)."""
    return {}


@pytest.fixture
def ui(workspace: Path, ui_env: dict[str, str]) -> Iterator[str]:
    proc, url = start_ui(workspace, env=ui_env)
    yield url
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
    jobs = Jobs(Workspace.at(workspace))  # jobs outlive the server by design: end the test's own
    for job in jobs.all():
        if jobs.stop(job):
            for _ in range(100):
                if jobs.status(job) != "running":
                    break
                time.sleep(0.2)


@pytest.fixture
def browser() -> Iterator[object]:
    if not os.path.exists(CHROMIUM):
        if os.environ.get("CI"):
            pytest.fail(f"{CHROMIUM} is missing in CI (.ci/run installs Debian's chromium before the tests)")
        pytest.skip(f"no Chromium at {CHROMIUM} (apt-get install chromium, or set LORATUNE_CHROMIUM): the browser "
                    "tests drive a real browser")
    playwright = pytest.importorskip("playwright.sync_api")
    with playwright.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
        yield b
        b.close()
