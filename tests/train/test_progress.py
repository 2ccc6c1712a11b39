"""What the progress reporter writes when output is not a terminal: step lines with the time left."""

from __future__ import annotations

import logging

from loratune.train.progress import Reporter


def test_log_lines_carry_the_time_left(caplog) -> None:
    r = Reporter(total_steps=100, start_step=20)  # a resumed run: its pace counts from step 20
    assert not r.tty
    r.t0 -= 30.0  # 30 s spent on the 10 steps 21..30: 3 s a step, 70 steps left
    with caplog.at_level(logging.INFO, logger="loratune.train"), r:
        r.step(30, 1.5, 2.25, 1e-4, 1234.0, 0.5, log_line=True)
    assert "step 30/100" in caplog.text and "loss 2.2500" in caplog.text
    assert "eta 3:30" in caplog.text
    assert r.eta(20) == "?"
    r.t0 -= 4000.0  # slower: 403 s a step for 10 steps, 70 left -> 7:50:10
    assert r.eta(30).startswith("7:50:")
