"""`loratune serve` against the official openai client and raw HTTP, on a live loopback server."""

from __future__ import annotations

import http.client
import json
import socket
import threading
import time
from collections.abc import Iterator

import httpx
import openai
import pytest

from loratune.infer.openai_api import Limits
from loratune.infer.server import create_app

KEY = "test-key-123"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LiveServer:
    """uvicorn in a background thread on a random loopback port."""

    def __init__(self, app) -> None:
        import uvicorn

        self.port = free_port()
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> "LiveServer":
        self.thread.start()
        deadline = time.time() + 20
        while not self.server.started:
            assert time.time() < deadline, "server did not start"
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=20)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


@pytest.fixture(scope="module", params=[1, 4], ids=["one-at-a-time", "batched"])
def live(engine, request) -> Iterator[LiveServer]:
    """The server as it runs one request at a time, and with continuous batching (4 slots) on the decoder."""
    limits = Limits(max_tokens=engine.context_length, default_max_tokens=16, max_n=4, max_stop=4,
                    max_body_bytes=64 * 1024)
    with LiveServer(create_app(engine, api_key=KEY, max_pending=2, limits=limits, batch_slots=request.param)) as server:
        yield server


@pytest.fixture(scope="module")
def client(live: LiveServer) -> openai.OpenAI:
    return openai.OpenAI(api_key=KEY, base_url=live.url + "/v1", max_retries=0, timeout=60)


def raw(live: LiveServer, method: str, path: str, body: object = None, key: str | None = KEY) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    if body is not None:
        headers["Content-Type"] = "application/json"
    content = body if isinstance(body, (bytes, str)) or body is None else json.dumps(body)
    return httpx.request(method, live.url + path, content=content, headers=headers, timeout=60)


MSGS = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is QLoRA?"}]


# ---------------------------------------------------------------------------------------- happy paths


def test_models_listing(client: openai.OpenAI) -> None:
    assert [m.id for m in client.models.list()] == ["base", "alpha", "beta"]
    assert client.models.retrieve("alpha").id == "alpha"


def test_chat_completion_equals_the_engine(client: openai.OpenAI, engine) -> None:
    from loratune.infer.engine import Delta, Finish
    from loratune.infer.sampling import SamplingParams

    r = client.chat.completions.create(model="alpha", messages=MSGS, max_tokens=12, temperature=0)
    events = list(engine.chat(MSGS, SamplingParams(max_new_tokens=12), "alpha"))
    assert r.choices[0].message.content == "".join(e.text for e in events if isinstance(e, Delta))
    assert r.choices[0].message.role == "assistant"
    fin = events[-1]
    assert isinstance(fin, Finish) and r.choices[0].finish_reason == fin.reason
    assert r.usage.prompt_tokens == len(engine.format("alpha").render(MSGS)) == fin.prompt_tokens
    assert r.usage.completion_tokens == fin.completion_tokens
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    assert r.model == "alpha" and r.id.startswith("chatcmpl-")


def test_chat_streaming_matches_non_streaming(client: openai.OpenAI) -> None:
    full = client.chat.completions.create(model="beta", messages=MSGS, max_tokens=16, temperature=0)
    stream = client.chat.completions.create(model="beta", messages=MSGS, max_tokens=16, temperature=0, stream=True,
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [full.choices[0].finish_reason]
    assert chunks[-1].usage.completion_tokens == full.usage.completion_tokens
    assert len([c for c in chunks if c.choices and c.choices[0].delta.content]) > 1  # really streamed


def test_adapter_chosen_by_model_field(client: openai.OpenAI) -> None:
    answers = {m: client.chat.completions.create(model=m, messages=MSGS, max_tokens=10, temperature=0)
               .choices[0].message.content for m in ("base", "alpha", "beta")}
    assert len(set(answers.values())) == 3


def test_completions_batch_and_n(client: openai.OpenAI) -> None:
    r = client.completions.create(model="alpha", prompt=["Once upon a time", "The model"], max_tokens=6,
                                  temperature=0.9, n=2, seed=1)
    assert len(r.choices) == 4 and [c.index for c in r.choices] == [0, 1, 2, 3]
    assert all(c.finish_reason in ("stop", "length") for c in r.choices)
    assert r.usage.completion_tokens <= 4 * 6 and r.usage.completion_tokens > 0
    one = client.completions.create(model="alpha", prompt="Once upon a time", max_tokens=6, temperature=0)
    again = client.completions.create(model="alpha", prompt="Once upon a time", max_tokens=6, temperature=0,
                                      stream=True)
    assert "".join(c.choices[0].text for c in again) == one.choices[0].text


def test_stop_string_and_length_finish(client: openai.OpenAI) -> None:
    r = client.completions.create(model="alpha", prompt="Hello", max_tokens=20, temperature=0, extra_body={"ignore_eos": True})
    text = r.choices[0].text
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 20
    stop = text[3:5]
    assert stop.strip(), text
    cut = client.completions.create(model="alpha", prompt="Hello", max_tokens=20, temperature=0, stop=[stop],
                                    extra_body={"ignore_eos": True})
    assert cut.choices[0].finish_reason == "stop"
    assert cut.choices[0].text == text[:text.index(stop)]


def test_default_max_tokens_and_streamed_n(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(model="alpha", messages=MSGS, extra_body={"ignore_eos": True})
    assert r.usage.completion_tokens == 16 and r.choices[0].finish_reason == "length"
    chunks = list(client.chat.completions.create(model="alpha", messages=MSGS, n=2, max_tokens=6, temperature=1.0,
                                                 seed=5, stream=True))
    texts = {0: "", 1: ""}
    for c in chunks:
        for ch in c.choices:
            texts[ch.index] += ch.delta.content or ""
    assert {ch.index for c in chunks for ch in c.choices if ch.finish_reason} == {0, 1}
    full = client.chat.completions.create(model="alpha", messages=MSGS, n=2, max_tokens=6, temperature=1.0, seed=5)
    assert [c.message.content for c in full.choices] == [texts[0], texts[1]]  # a seed reproduces a request


def test_sse_wire_format_ends_with_done(live: LiveServer) -> None:
    body = {"model": "alpha", "messages": MSGS, "max_tokens": 5, "stream": True}
    with httpx.stream("POST", live.url + "/v1/chat/completions", json=body,
                      headers={"Authorization": f"Bearer {KEY}"}, timeout=60) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines)
    assert lines[-1] == "data: [DONE]"
    assert json.loads(lines[0][6:])["choices"][0]["delta"]["role"] == "assistant"


def test_health(live: LiveServer) -> None:
    h = raw(live, "GET", "/health").json()
    assert h["status"] == "ok" and h["models"] == ["base", "alpha", "beta"] and h["max_pending"] == 2


# ---------------------------------------------------------------------------------------------- errors


def _err(r: httpx.Response, status: int) -> dict:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    return body["error"]


def test_api_key_protects_every_route(live: LiveServer) -> None:
    for method, path in [("GET", "/health"), ("GET", "/v1/models"), ("GET", "/v1/models/alpha"),
                         ("POST", "/v1/chat/completions"), ("POST", "/v1/completions"), ("GET", "/nope")]:
        for key in (None, "wrong"):
            err = _err(raw(live, method, path, {"model": "alpha", "prompt": "x"}, key=key), 401)
            assert err["code"] == "invalid_api_key"
    bad = openai.OpenAI(api_key="wrong", base_url=live.url + "/v1", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()


def test_unknown_model_404(client: openai.OpenAI, live: LiveServer) -> None:
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="gpt-9", messages=MSGS)
    assert "gpt-9" in str(e.value)
    err = _err(raw(live, "POST", "/v1/completions", {"model": "nope", "prompt": "x"}), 404)
    assert err["code"] == "model_not_found" and err["param"] == "model"
    _err(raw(live, "GET", "/v1/models/nope"), 404)
    _err(raw(live, "GET", "/v2/whatever"), 404)


def test_context_overflow_names_both_numbers(client: openai.OpenAI, engine) -> None:
    n_prompt = len(engine.format("alpha").render(MSGS))
    ask = engine.context_length - n_prompt + 1
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="alpha", messages=MSGS, max_tokens=ask)
    msg = e.value.body["message"]
    assert str(n_prompt) in msg and str(ask) in msg and str(engine.context_length) in msg
    assert e.value.body["code"] == "context_length_exceeded"
    # max_tokens alone beyond the context: still the context message with both numbers, not only a cap
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="alpha", messages=MSGS, max_tokens=engine.context_length + 5)
    msg = e.value.body["message"]
    assert f"({n_prompt} in the prompt, {engine.context_length + 5} for max_tokens)" in msg


@pytest.mark.parametrize("patch, param", [
    ({"max_tokens": 0}, "max_tokens"), ({"max_tokens": 10**6}, "max_tokens"), ({"max_tokens": "ten"}, "max_tokens"),
    ({"temperature": 2.5}, "temperature"), ({"temperature": -1}, "temperature"),
    ({"top_p": 0}, "top_p"), ({"top_p": 1.5}, "top_p"), ({"n": 0}, "n"), ({"n": 5}, "n"),
    ({"stop": ["a", "b", "c", "d", "e"]}, "stop"), ({"stop": [""]}, "stop"), ({"stop": "x" * 300}, "stop"),
    ({"messages": []}, "messages"), ({"messages": [{"role": "wizard", "content": "x"}]}, "messages.0.role"),
    ({"presence_penalty": 0.5}, "presence_penalty"), ({"tools": [{"type": "function"}]}, "tools.0.function"),
    ({"model": None}, "model"),
])
def test_chat_validation_400(live: LiveServer, patch: dict, param: str) -> None:
    body = {"model": "alpha", "messages": MSGS, "max_tokens": 4, **patch}
    err = _err(raw(live, "POST", "/v1/chat/completions", body), 400)
    assert err["param"] == param and err["type"] == "invalid_request_error"


def test_malformed_bodies(live: LiveServer) -> None:
    _err(raw(live, "POST", "/v1/chat/completions", b"{not json"), 400)
    _err(raw(live, "POST", "/v1/chat/completions", b"[1, 2]"), 400)
    _err(raw(live, "POST", "/v1/completions", {"model": "alpha", "prompt": [999999]}), 400)
    _err(raw(live, "POST", "/v1/completions", {"model": "alpha", "prompt": "x", "echo": True}), 400)
    err = _err(raw(live, "POST", "/v1/chat/completions", {"model": "alpha", "messages": MSGS, "pad": "x" * 70000}), 413)
    assert "65536" in err["message"]


def _stream_request(live: LiveServer, max_tokens: int) -> http.client.HTTPConnection:
    """Start a long streaming generation and read its first event; return the open connection."""
    conn = http.client.HTTPConnection("127.0.0.1", live.port, timeout=60)
    body = json.dumps({"model": "base", "prompt": "go", "max_tokens": max_tokens, "stream": True,
                       "ignore_eos": True, "temperature": 0})
    conn.request("POST", "/v1/completions", body, {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    resp = conn.getresponse()
    assert resp.status == 200
    assert resp.readline().startswith(b"data: ")
    return conn


def _wait_idle(live: LiveServer, timeout: float = 5.0) -> dict:
    deadline = time.time() + timeout
    while (h := raw(live, "GET", "/health").json())["pending"] and time.time() < deadline:
        time.sleep(0.02)
    return h


def test_queue_bound_gives_429_and_disconnect_frees_the_slot(live: LiveServer, client: openai.OpenAI) -> None:
    before = _wait_idle(live)
    long_a = _stream_request(live, 2000)  # ~seconds of work each on the tiny model
    # the second slot: a non-streaming request, queued behind the first
    conn_b = http.client.HTTPConnection("127.0.0.1", live.port, timeout=60)
    conn_b.request("POST", "/v1/completions", json.dumps({"model": "base", "prompt": "q", "max_tokens": 2000,
                                                          "ignore_eos": True}),
                   {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    deadline = time.time() + 5
    while raw(live, "GET", "/health").json()["pending"] < 2:
        assert time.time() < deadline
        time.sleep(0.01)
    with pytest.raises(openai.RateLimitError):
        client.completions.create(model="base", prompt="x", max_tokens=2)
    err = _err(raw(live, "POST", "/v1/completions", {"model": "base", "prompt": "x", "max_tokens": 2}), 429)
    assert err["code"] == "rate_limit_exceeded"
    started = time.time()
    long_a.close()  # a streaming client goes away ...
    conn_b.close()  # ... and so does a queued non-streaming one
    h = _wait_idle(live)
    assert h["pending"] == 0, h
    assert time.time() - started < 2.0  # 2000 + 2000 tokens would take far longer
    assert h["cancelled"] - before["cancelled"] == 2
    assert client.completions.create(model="base", prompt="x", max_tokens=2).choices[0].finish_reason


def test_queued_streaming_client_that_leaves_frees_its_slot_at_once(live: LiveServer) -> None:
    """A streaming request waiting behind a long one, whose client goes away, gives its slot back while the
    long one is still running (not when the worker reaches it), and is never generated."""
    before = _wait_idle(live)
    long_a = _stream_request(live, 2000)
    conn_b = http.client.HTTPConnection("127.0.0.1", live.port, timeout=60)
    conn_b.request("POST", "/v1/completions", json.dumps({"model": "base", "prompt": "q", "max_tokens": 2000,
                                                          "stream": True, "ignore_eos": True}),
                   {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    deadline = time.time() + 5
    while raw(live, "GET", "/health").json()["pending"] < 2:
        assert time.time() < deadline
        time.sleep(0.01)
    conn_b.close()
    deadline = time.time() + 2
    while (h := raw(live, "GET", "/health").json())["pending"] != 1:
        assert time.time() < deadline, h
        time.sleep(0.01)
    assert h["running"] == 1 and h["cancelled"] - before["cancelled"] == 1  # A still runs; B is gone
    long_a.close()
    h = _wait_idle(live)
    assert h["pending"] == 0 and h["cancelled"] - before["cancelled"] == 2
    assert h["completed"] == before["completed"]


def test_finished_requests_count_as_completed(live: LiveServer, client: openai.OpenAI) -> None:
    before = _wait_idle(live)
    list(client.completions.create(model="alpha", prompt="Hi", max_tokens=3, stream=True))
    client.completions.create(model="alpha", prompt="Hi", max_tokens=3)
    h = _wait_idle(live)
    assert h["completed"] - before["completed"] == 2 and h["cancelled"] == before["cancelled"]


def test_cli_serve_binds_loopback_and_takes_the_key_from_the_environment(adapter_a, tmp_path) -> None:
    """`loratune serve` as a user runs it: 127.0.0.1 by default, LORATUNE_API_KEY guards it, Ctrl-C stops it."""
    import os
    import signal
    import subprocess
    import sys

    port = free_port()
    env = {**os.environ, "LORATUNE_API_KEY": "from-env"}
    proc = subprocess.Popen([sys.executable, "-m", "loratune.cli", "serve", f"mine={adapter_a}", "--port", str(port)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        banner = proc.stdout.readline()
        while "loratune serve" not in banner:
            assert proc.poll() is None, banner
            banner = proc.stdout.readline()
        assert f"http://127.0.0.1:{port}/v1" in banner and "API key required" in banner
        deadline = time.time() + 30
        while True:
            try:
                r = httpx.get(f"http://127.0.0.1:{port}/v1/models", headers={"Authorization": "Bearer from-env"})
                break
            except httpx.ConnectError:
                assert time.time() < deadline
                time.sleep(0.1)
        assert [m["id"] for m in r.json()["data"]] == ["base", "mine"]
        assert httpx.get(f"http://127.0.0.1:{port}/health").status_code == 401
        c = openai.OpenAI(api_key="from-env", base_url=f"http://127.0.0.1:{port}/v1", max_retries=0)
        assert c.chat.completions.create(model="mine", messages=MSGS, max_tokens=3).usage.completion_tokens >= 1
        addrs = {ip for ip in socket.gethostbyname_ex(socket.gethostname())[2] if not ip.startswith("127.")}
        for ip in addrs:  # not reachable on the machine's other addresses
            with pytest.raises(httpx.ConnectError):
                httpx.get(f"http://{ip}:{port}/health", timeout=2)
    finally:
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 0


def test_cli_serve_port_in_use_and_bad_host_are_one_line_errors(adapter_a, tmp_path, capsys) -> None:
    from loratune.cli import main

    assert main(["serve", str(tmp_path / "missing"), "--port", str(free_port())]) == 2
    assert capsys.readouterr().err.strip() == f"error: no such folder: {tmp_path / 'missing'}"

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert main(["serve", str(adapter_a), "--port", str(port)]) == 2
    assert capsys.readouterr().err.strip() == f"error: cannot listen on 127.0.0.1:{port}: Address already in use; " \
                                               "pick another --port"
    assert main(["serve", str(adapter_a), "--host", "no.such.host.invalid"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --host 'no.such.host.invalid' is not an address of this machine") and "\n" not in err
