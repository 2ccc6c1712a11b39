"""Continuous batching: requests that join and leave a running batch answer exactly as they do alone.

The reference for each request is `Engine.generate` with that request alone; the batcher runs them
together on one decoder, admitting them at different steps, with fewer slots than rows over time (slots are
reused), with stop strings, several rows per request, seeded sampling, a repetition penalty, cancellation
and a second adapter that has to wait for the batch to drain.
"""

from __future__ import annotations

import pytest

from loratune.errors import ModelError
from loratune.infer.batcher import Batcher, Submission
from loratune.infer.engine import Delta, Finish
from loratune.infer.sampling import SamplingParams


def _alone(engine, sub: Submission) -> list:
    return list(engine.generate(sub.prompts, sub.params, sub.name, ignore_eos=sub.ignore_eos))


def _submission(engine, name: str, texts: list[str], **kw) -> tuple[Submission, list]:
    fmt = engine.format(name)
    got: list = []
    ignore = kw.pop("ignore_eos", False)
    prompts = [fmt.render([{"role": "user", "content": t}]) for t in texts]
    return Submission(prompts, SamplingParams(**kw), name, got.append, ignore_eos=ignore), got


def _run(batcher: Batcher, schedule: dict[int, list[Submission]], waiting: list[Submission] | None = None) -> int:
    """Step the batcher, admitting `schedule[i]` before step i (in order, once they fit); returns the most
    requests that ran together."""
    queue = list(waiting or [])
    i = most = 0
    while i in schedule or queue or not batcher.empty or any(k > i for k in schedule):
        queue += schedule.get(i, [])
        while queue and batcher.fits(queue[0]):
            batcher.admit(queue.pop(0))
        most = max(most, len(batcher.running))
        if not batcher.empty:
            batcher.step()
        i += 1
        assert i < 500
    return most


def test_requests_joining_and_leaving_answer_as_alone(engine) -> None:
    a, got_a = _submission(engine, "alpha", ["Tell me a story", "Hi"], max_new_tokens=12, ignore_eos=True)
    b, got_b = _submission(engine, "alpha", ["What is LoRA?"], max_new_tokens=6)
    c, got_c = _submission(engine, "alpha", ["Sample"], max_new_tokens=10, temperature=1.0, top_p=0.9, seed=4)
    d, got_d = _submission(engine, "alpha", ["Again and again"], max_new_tokens=9, repetition_penalty=1.7)
    text = "".join(e.text for e in _alone(engine, a)[:8] if isinstance(e, Delta) and e.row == 0)
    e, got_e = _submission(engine, "alpha", ["Tell me a story"], max_new_tokens=12, stop=(text[-3:],),
                           ignore_eos=True)
    batcher = Batcher(engine, slots=4)
    assert _run(batcher, {0: [a, b], 2: [c], 3: [d], 5: [e]}) >= 3  # d and e wait for free slots
    for sub, got in ((a, got_a), (b, got_b), (c, got_c), (d, got_d), (e, got_e)):
        assert got == _alone(engine, sub), sub.prompts
    assert sorted(batcher.free) == [0, 1, 2, 3] and batcher.empty
    assert batcher.decoder.cache.lengths == [0, 0, 0, 0]


def test_another_adapter_joins_the_running_batch(engine) -> None:
    a, got_a = _submission(engine, "alpha", ["One"], max_new_tokens=5, ignore_eos=True)
    b, got_b = _submission(engine, "beta", ["Two"], max_new_tokens=5, ignore_eos=True)
    c, got_c = _submission(engine, "base", ["Three"], max_new_tokens=3, ignore_eos=True)
    batcher = Batcher(engine, slots=4)
    batcher.admit(a)
    batcher.step()
    assert batcher.fits(b)  # rows of several adapters decode together (decoder/multi_lora.py)
    _run(batcher, {}, [b, c])
    assert batcher.mixed_passes > 0
    for sub, got in ((a, got_a), (b, got_b), (c, got_c)):
        assert got == _alone(engine, sub)
    assert got_a != got_b


def test_a_cancelled_request_ends_and_frees_its_slots_while_others_go_on(engine) -> None:
    flag = {"stop": False}
    a, got_a = _submission(engine, "alpha", ["Long", "Longer"], max_new_tokens=20, ignore_eos=True)
    a.cancel = lambda: flag["stop"]
    b, got_b = _submission(engine, "alpha", ["Other"], max_new_tokens=8, ignore_eos=True)
    batcher = Batcher(engine, slots=3)
    batcher.admit(a)
    batcher.admit(b)
    for _ in range(3):
        assert batcher.step() == []
    flag["stop"] = True
    assert batcher.step() == [a]
    assert sorted(batcher.free) == [0, 1]
    finishes = [e for e in got_a if isinstance(e, Finish)]
    assert [(f.reason, f.completion_tokens) for f in finishes] == [("cancelled", 3), ("cancelled", 3)]
    _run(batcher, {})
    assert got_b == _alone(engine, b)


def test_a_request_with_no_room_ends_at_once_and_the_fallback_engine_is_refused(engine, hf_engine) -> None:
    fmt = engine.format("alpha")
    got: list = []
    long = [fmt.encode("x")[0]] * 30
    batcher = Batcher(engine, slots=1, capacity=30)
    batcher.admit(Submission([long], SamplingParams(max_new_tokens=4), "alpha", got.append))
    batcher.step()
    assert got == [Finish(0, "length", 30, 0, None)] and batcher.empty and batcher.free == [0]
    with pytest.raises(ModelError, match="loratune's decoder"):
        Batcher(hf_engine, slots=2)
