"""pytest plugin for the newest-releases run (.ci/newest): collect every deprecation notice and report them.

A dependency announces a removal in one of two ways: a DeprecationWarning / FutureWarning /
PendingDeprecationWarning (peft, bitsandbytes, torch, and transformers' `deprecate_kwarg`), or a
logged warning (transformers' `logger.warning_once`). pyproject.toml ignores the warnings in the normal
run, where they are noise; .ci/newest turns them back on (`-W default::...`) and loads this plugin
(`-p deprecations`, with .ci on PYTHONPATH), which records both kinds for the whole session and
prints one line per distinct notice at the end:

    DEPRECATION <where> <category> <file:line> x<count> <message>

`where` is `ours` when the notice points into this repository (src/ or tests/: our code calls
something that is going away, the case to fix first) and `deps` when it points into a library
(often one dependency calling another; worth reading, rarely ours to fix). With
DEPRECATION_REPORT=path the same records are also written there as JSON.
"""

from __future__ import annotations

import json
import logging
import os
import re
import warnings
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
OURS = (str(ROOT / "src") + os.sep, str(ROOT / "tests") + os.sep)
CATEGORIES = (DeprecationWarning, PendingDeprecationWarning, FutureWarning)
LOGGED = re.compile(r"deprecat|will be removed|no longer (be )?supported|removed in (v|version )?\d", re.IGNORECASE)


@dataclass(frozen=True)
class Notice:
    where: str  # "ours" or "deps"
    category: str  # the warning class, or "log:<logger>" for a logged notice
    location: str  # file:line, relative to the repository or to site-packages
    message: str  # the first line, at most 300 characters
    first_test: str


def _where_and_location(filename: str, lineno: int) -> tuple[str, str]:
    path = str(Path(filename).resolve()) if filename else "?"
    if path.startswith(OURS):
        return "ours", f"{os.path.relpath(path, ROOT)}:{lineno}"
    tail = path.split("site-packages" + os.sep, 1)[-1]
    return "deps", f"{tail}:{lineno}"


def _first_line(text: str) -> str:
    return " ".join(str(text).strip().splitlines()[:1])[:300]


class _LogNotices(logging.Handler):
    """Keeps logged warnings that announce a deprecation or removal."""

    def __init__(self, sink: Collector) -> None:
        super().__init__(level=logging.WARNING)
        self.sink = sink

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = record.getMessage()
        except (TypeError, ValueError):  # a malformed record (bad % arguments) is its library's problem
            return
        if LOGGED.search(text):
            where, location = _where_and_location(record.pathname, record.lineno)
            self.sink.add(Notice(where, f"log:{record.name}", location, _first_line(text), self.sink.current))


class Collector:
    def __init__(self) -> None:
        self.counts: Counter[Notice] = Counter()
        self.keys: dict[tuple[str, str, str], Notice] = {}
        self.current = "(collection)"
        self.handler = _LogNotices(self)
        self.loggers = [logging.getLogger(), logging.getLogger("transformers")]

    def add(self, notice: Notice) -> None:
        key = (notice.category, notice.location, notice.message)
        notice = self.keys.setdefault(key, notice)  # the first test that saw it stays on the record
        self.counts[notice] += 1

    @pytest.hookimpl
    def pytest_sessionstart(self, session: pytest.Session) -> None:
        for logger in self.loggers:  # transformers' logger does not propagate to the root logger
            logger.addHandler(self.handler)

    @pytest.hookimpl(tryfirst=True)
    def pytest_runtest_logstart(self, nodeid: str, location: object) -> None:
        self.current = nodeid

    @pytest.hookimpl
    def pytest_warning_recorded(self, warning_message: warnings.WarningMessage, when: str, nodeid: str,
                                location: object) -> None:
        if not issubclass(warning_message.category, CATEGORIES):
            return
        where, loc = _where_and_location(warning_message.filename, warning_message.lineno)
        self.add(Notice(where, warning_message.category.__name__, loc, _first_line(warning_message.message),
                        nodeid or self.current))

    @pytest.hookimpl
    def pytest_terminal_summary(self, terminalreporter: pytest.TerminalReporter) -> None:
        for logger in self.loggers:
            logger.removeHandler(self.handler)
        notices = sorted(self.counts, key=lambda n: (n.where != "ours", -self.counts[n], n.location))
        ours = sum(1 for n in notices if n.where == "ours")
        terminalreporter.section("deprecation notices")
        terminalreporter.write_line(f"DEPRECATIONS {len(notices)} distinct, {ours} pointing into our code")
        for n in notices:
            terminalreporter.write_line(f"DEPRECATION {n.where} {n.category} {n.location} x{self.counts[n]} "
                                        f"{n.message} [first: {n.first_test}]")
        out = os.environ.get("DEPRECATION_REPORT")
        if out:
            rows = [{**asdict(n), "count": self.counts[n]} for n in notices]
            Path(out).write_text(json.dumps(rows, indent=1) + "\n", encoding="utf-8")


def pytest_configure(config: pytest.Config) -> None:
    config.pluginmanager.register(Collector(), "deprecation-collector")
