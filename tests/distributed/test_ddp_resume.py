"""Kill -9 of one rank (or SIGTERM on one), then resume on two ranks: the adapter is the uninterrupted one.

The base run of the training tests (dropout on, so every rank's RNG matters) on two gloo ranks: 8 steps, a
checkpoint every 3. Each rank's share of a step is one padding-free micro-batch, so backward #k is in step k.
When one rank dies the other fails at its next collective (gloo sees the peer gone) instead of hanging; the
launcher (torchrun) would end it too. The final adapter must equal the uninterrupted two-rank run's byte for
byte, which needs rank 0's training state and every rank's RNG state to come back exactly.
"""

from __future__ import annotations

import signal
from pathlib import Path

import pytest
from ddp_helpers import launch
from train_helpers import adapter_bytes, write_run_yaml

from loratune.train.checkpoint import list_checkpoints, step_of

KILLED = -signal.SIGKILL

# (rank, fault, where the checkpoints stand afterwards)
CHAIN = [
    (1, "kill@step.backward#5", 3),  # rank 1 dies mid-step 5; step 3 is saved
    (1, "term@step.end#2", 5),  # SIGTERM on rank 1 at the end of step 5 (from 3): both stop, one checkpoint at 5
    (0, "kill@save.files#1", 5),  # rank 0 (the writer) dies writing step 6's checkpoint: resumes from 5
]


@pytest.mark.slow
def test_kill_one_rank_then_resume_is_exact(tmp_path: Path, tiny_llama: Path) -> None:
    ref = tmp_path / "ref"
    ref.mkdir()
    ranks = launch(write_run_yaml(ref, tiny_llama), 2)
    assert ranks.codes == [0, 0], ranks.tail()
    expected = adapter_bytes(ref / "out")

    path = write_run_yaml(tmp_path, tiny_llama)
    for rank, fault, saved in CHAIN:
        ranks = launch(path, 2, faults={rank: fault})
        assert None not in ranks.codes, ranks.tail()  # nobody hangs on a dead peer
        if fault.startswith("kill"):
            assert ranks.codes[rank] == KILLED, ranks.tail()
            assert ranks.codes[1 - rank] != 0, ranks.tail()  # the survivor fails at its next collective
        else:
            assert ranks.codes == [128 + signal.SIGTERM] * 2, ranks.tail()  # both stop, as the signalled one
            assert "stopped by SIGTERM after step 5/8" in ranks.logs[0], ranks.tail()  # said once, by rank 0
            assert "stopped by" not in ranks.logs[1]
        assert max(step_of(p) for p in list_checkpoints(tmp_path / "out" / "checkpoints")) == saved
    ranks = launch(path, 2)
    assert ranks.codes == [0, 0], ranks.tail()
    assert adapter_bytes(tmp_path / "out") == expected


def test_resume_on_another_number_of_processes_is_refused(tmp_path: Path, tiny_llama: Path) -> None:
    """A checkpoint of two ranks resumed by one process: a clear error naming both counts; resumed by two
    with train.devices set to 2 (it was auto): no config change, it resumes."""
    path = write_run_yaml(tmp_path, tiny_llama)
    stopped = launch(path, 2, faults={0: "term@step.end#2"})  # checkpoint of step 2, unfinished
    assert stopped.codes[0] == 128 + signal.SIGTERM, stopped.tail()
    alone = launch(path, 1)
    assert alone.codes == [2], alone.tail()  # the CLI's exit code for a config error
    assert "written by 2 process(es), this run has 1" in alone.logs[0], alone.tail()
    assert "Traceback" not in alone.logs[0] and "memory plan" not in alone.logs[0]  # before anything loads
    both = launch(path, 2, "train.devices=2")  # naming the count is no config change: it resumes
    assert both.codes == [0, 0], both.tail()
    assert "resuming from" in both.logs[0] and "step 2 of 8" in both.logs[0], both.tail()
