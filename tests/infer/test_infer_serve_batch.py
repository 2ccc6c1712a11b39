"""`loratune serve` with continuous batching: concurrent requests decode together and answer as they do alone.

(The whole of test_infer_server.py also runs against a batching server; this file checks what only
batching does: requests running at the same time, several adapters queued behind each other, the slot size.)
"""

from __future__ import annotations

import threading
import time

import openai
from test_infer_server import KEY, LiveServer, raw

from loratune.infer.engine import Delta
from loratune.infer.sampling import SamplingParams
from loratune.infer.server import create_app

PROMPTS = ["Tell me a story", "Hi", "What is LoRA and why does it help?", "Count"]


def _alone(engine, name: str, prompt: str, n: int) -> str:
    fmt = engine.format(name)
    events = engine.generate([fmt.encode(prompt)], SamplingParams(max_new_tokens=n), name, ignore_eos=True)
    return "".join(e.text for e in events if isinstance(e, Delta))


def test_concurrent_requests_run_together_and_answer_as_alone(engine) -> None:
    with LiveServer(create_app(engine, api_key=KEY, max_pending=8, batch_slots=4)) as live:
        client = openai.OpenAI(api_key=KEY, base_url=live.url + "/v1", max_retries=0, timeout=60)
        names = ["alpha", "alpha", "alpha", "beta", "beta", "alpha"]
        jobs = [(names[i], PROMPTS[i % 4], 40 + 10 * i) for i in range(6)]
        answers: dict[int, str] = {}
        most = {"running": 0}

        def ask(i: int) -> None:
            name, prompt, n = jobs[i]
            r = client.completions.create(model=name, prompt=prompt, max_tokens=n, temperature=0,
                                          extra_body={"ignore_eos": True})
            answers[i] = r.choices[0].text

        threads = [threading.Thread(target=ask, args=(i,)) for i in range(6)]
        for t in threads:
            t.start()
        while any(t.is_alive() for t in threads):
            most["running"] = max(most["running"], raw(live, "GET", "/health").json()["running"])
            time.sleep(0.005)
        for t in threads:
            t.join()
        assert most["running"] >= 2  # requests of one adapter decoded together
        for i, (name, prompt, n) in enumerate(jobs):
            assert answers[i] == _alone(engine, name, prompt, n), i
        h = raw(live, "GET", "/health").json()
        assert h["pending"] == 0 and h["running"] == 0 and h["completed"] == 6


def test_a_request_larger_than_a_slot_is_a_clear_400(engine) -> None:
    with LiveServer(create_app(engine, api_key=KEY, batch_slots=2, slot_tokens=32)) as live:
        r = raw(live, "POST", "/v1/completions", {"model": "base", "prompt": "Hi", "max_tokens": 40})
        assert r.status_code == 400
        err = r.json()["error"]
        assert err["param"] == "max_tokens" and "32 tokens of a batch slot" in err["message"]
        ok = raw(live, "POST", "/v1/completions", {"model": "base", "prompt": "Hi", "max_tokens": 8})
        assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] <= 8
