"""The fault points' parsing and actions (the process-killing ones are exercised by test_resume_kill.py)."""

from __future__ import annotations

import pytest

from loratune.train import faults


@pytest.fixture(autouse=True)
def _fresh_counts():
    faults.reset()
    yield
    faults.reset()


def test_nan_acts_on_the_nth_arrival_only(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(faults.ENV, "nan@loss#3")
    assert [faults.fault("loss") for _ in range(5)] == [False, False, True, False, False]
    assert faults.fault("step.end") is False


def test_slow_sleeps_at_every_arrival(monkeypatch: pytest.MonkeyPatch) -> None:
    slept: list[float] = []
    monkeypatch.setattr(faults.time, "sleep", slept.append)
    monkeypatch.setenv(faults.ENV, "slow@step.end")
    assert [faults.fault("step.end") for _ in range(3)] == [False, False, False]
    assert faults.fault("loss") is False
    assert slept == [faults.SLOW_SECONDS] * 3


def test_unknown_action_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(faults.ENV, "explode@loss")
    with pytest.raises(ValueError, match="ACTION one of kill, term, int, nan, slow"):
        faults.fault("loss")
