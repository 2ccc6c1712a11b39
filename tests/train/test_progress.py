"""What the progress reporter shows: the time left computed from the step times it was given, the smoothed
loss and tokens/s of the metrics window, and the same text on the bar and in the log lines."""

from __future__ import annotations

import logging

import pytest

from loratune.train.metrics import Window
from loratune.train.progress import Reporter, clock_text, time_left


class Clock:
    """A clock the test moves by hand: the reporter's notion of elapsed time."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _messages(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "loratune.train"]


def test_time_left_is_this_sessions_mean_step_time_times_the_steps_left(caplog) -> None:
    clock = Clock()
    r = Reporter(total_steps=100, start_step=20, clock=clock)  # a resumed run: its pace counts from step 20
    assert not r.tty and r.eta(20) == "?"  # no step done yet in this session
    with caplog.at_level(logging.INFO, logger="loratune.train"), r:
        for step, seconds in zip(range(21, 25), (2.0, 4.0, 3.5, 2.5)):  # 12 s for 4 steps: 3 s a step
            clock.now += seconds
            r.step(step, 1.5, 2.25, 1e-4, 1234.0, 0.5, log_line=step == 24)
    # 76 steps left x 3 s = 228 s
    assert _messages(caplog) == ["step 24/100  ep 1.50 loss 2.2500 lr 1.0e-04 1,234 tok/s 0.5GiB  eta 3:48"]
    assert r.progress.tasks[0].fields["info"] == "ep 1.50 loss 2.2500 lr 1.0e-04 1,234 tok/s 0.5GiB"
    assert r.progress.tasks[0].completed == 24
    clock.now += 4000.0 - 12.0  # 4000 s for the 4 steps: 1000 s a step, 76 left: 76,000 s
    assert r.eta(24) == "21:06:40"


def test_time_left_arithmetic() -> None:
    assert time_left(0, 5.0, 10) is None
    assert time_left(4, 12.0, 76) == 228.0
    assert time_left(3, 10.0, 0) == 0.0 and time_left(3, 10.0, -2) == 0.0  # never negative
    assert time_left(10, 4030.0, 990) == pytest.approx(398_970.0)
    assert [clock_text(s) for s in (0.4, 59.4, 59.6, 228.0, 3599.4, 3600.0, 398_970.0)] == \
        ["0:00", "0:59", "1:00", "3:48", "59:59", "1:00:00", "110:49:30"]


def test_the_console_shows_the_window_not_the_last_step(caplog) -> None:
    """CPU step times swing (6 and 1,670 tokens/s here); the console shows the window's smoothed figures."""
    window, clock = Window(4), Clock()
    r = Reporter(total_steps=8, clock=clock)
    steps = [  # (summed token loss, supervised tokens, real tokens, seconds): 6 tok/s, then 1,670 tok/s
        (12.0, 4, 60, 10.0), (3.0, 2, 1670, 1.0), (5.0, 2, 1670, 1.0), (4.0, 2, 1670, 1.0), (2.0, 4, 835, 0.5)]
    with caplog.at_level(logging.INFO, logger="loratune.train"), r:
        for step, (loss_sum, tokens, real, seconds) in enumerate(steps, start=1):
            window.add(loss_sum, tokens, real, seconds)
            clock.now += seconds
            r.step(step, step / 8, window.loss(), 1e-4, window.tokens_per_s(), 0.5, log_line=step in (4, 5))
    lines = _messages(caplog)
    # steps 1-4: (12 + 3 + 5 + 4) / (4 + 2 + 2 + 2) = 2.4 per token; (60 + 3 x 1670) / 13 s = 390 tok/s
    assert lines[0].startswith("step 4/8  ep 0.50 loss 2.4000 lr 1.0e-04 390 tok/s 0.5GiB  eta ")
    # steps 2-5: (3 + 5 + 4 + 2) / (2 + 2 + 2 + 4) = 1.4; (3 x 1670 + 835) / 3.5 s = 1,670 tok/s
    assert lines[1].startswith("step 5/8  ep 0.62 loss 1.4000 lr 1.0e-04 1,670 tok/s 0.5GiB  eta ")
    # 13.5 s for 5 steps: 2.7 s a step, 3 left: 8.1 s
    assert lines[1].endswith("eta 0:08")


def test_a_window_without_a_finite_loss_shows_none() -> None:
    r = Reporter(total_steps=2, clock=Clock())
    r.step(1, 0.1, None, 1e-4, 100.0, 0.5, log_line=False)
    assert r.progress.tasks[0].fields["info"] == "ep 0.10 loss - lr 1.0e-04 100 tok/s 0.5GiB"
