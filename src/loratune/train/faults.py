"""Named fault points, so tests can kill or poison a real training process at an exact moment.

`LORATUNE_FAULT=ACTION@POINT[#N]` makes the N-th arrival (default the first) at `POINT` do `ACTION`:

    kill   SIGKILL this process (no handler, no cleanup: what a power cut or the OOM killer does)
    term   send SIGTERM to this process (the graceful-stop path)
    int    send SIGINT to this process (Ctrl-C)
    nan    `fault()` returns True and the caller poisons a value with inf (the non-finite guard's test)
    slow   sleep half a second at every arrival (N ignored): paces a run for tests that act on it while it
           trains (the web UI's browser test stops a run mid-way, however fast the machine)

Points are plain strings passed to `fault()` where the code wants one: `step.backward` (after each
micro-batch's backward), `step.end`, `save.files` (the checkpoint's files written, no manifest yet),
`save.manifest` (manifest written, folder not yet renamed), `save.renamed` (in place, older ones not yet
rotated), `save.rotated`, `loss` (each micro-batch's loss, with `nan`).

Unset, `fault()` is one comparison. Nothing in normal use sets the variable.
"""

from __future__ import annotations

import os
import signal
import time
from collections import Counter

ENV = "LORATUNE_FAULT"
_ACTIONS = ("kill", "term", "int", "nan", "slow")
SLOW_SECONDS = 0.5
_seen: Counter[str] = Counter()


def _parse(spec: str) -> tuple[str, str, int] | None:
    if not spec:
        return None
    action, _, rest = spec.partition("@")
    point, _, nth = rest.partition("#")
    if action not in _ACTIONS or not point:
        raise ValueError(f"{ENV}={spec!r}: expected ACTION@POINT[#N] with ACTION one of {', '.join(_ACTIONS)}")
    return action, point, int(nth or 1)


def reset() -> None:
    """Forget the arrivals counted so far (each training run counts from zero)."""
    _seen.clear()


def fault(point: str) -> bool:
    """Count an arrival at `point`; act if `LORATUNE_FAULT` names it. True only for a due `nan` fault."""
    spec = _parse(os.environ.get(ENV, ""))
    if spec is None or spec[1] != point:
        return False
    _seen[point] += 1
    action, _, nth = spec
    if action == "slow":
        time.sleep(SLOW_SECONDS)
        return False
    if _seen[point] != nth:
        return False
    if action == "nan":
        return True
    sig = {"kill": signal.SIGKILL, "term": signal.SIGTERM, "int": signal.SIGINT}[action]
    os.kill(os.getpid(), sig)
    return False
