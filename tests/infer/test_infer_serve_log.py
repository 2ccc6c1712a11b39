"""What `loratune serve` writes: one access-log record per request, and no progress bars while loading."""

from __future__ import annotations

import logging
import time

import pytest
from starlette.testclient import TestClient

from loratune.infer.openai_api import Limits
from loratune.infer.server import create_app

ACCESS = "loratune.serve.access"


def _records(caplog: pytest.LogCaptureFixture, n: int) -> list[logging.LogRecord]:
    deadline = time.time() + 5  # the line is written after the last byte, on the server's side
    while len(found := [r for r in caplog.records if r.name == ACCESS]) < n and time.time() < deadline:
        time.sleep(0.01)
    return found


def test_each_request_writes_one_access_log_record(engine, caplog) -> None:
    caplog.set_level(logging.INFO, logger=ACCESS)
    app = create_app(engine, api_key="k", limits=Limits(max_tokens=engine.context_length, default_max_tokens=3))
    with TestClient(app, raise_server_exceptions=False) as client:
        ok = client.post("/v1/chat/completions", headers={"Authorization": "Bearer k"},
                         json={"model": "alpha", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3})
        streamed = client.post("/v1/completions", headers={"Authorization": "Bearer k"},
                               json={"model": "base", "prompt": "Hi", "max_tokens": 3, "stream": True})
        denied = client.get("/v1/models")
        missing = client.get("/v1/models/nope%0Afake line", headers={"Authorization": "Bearer k"})
    assert (ok.status_code, streamed.status_code, denied.status_code, missing.status_code) == (200, 200, 401, 404)
    records = _records(caplog, 4)
    got = [(r.http_method, r.http_path, r.http_status) for r in records]
    assert got == [("POST", "/v1/chat/completions", 200), ("POST", "/v1/completions", 200),
                   ("GET", "/v1/models", 401), ("GET", "/v1/models/nope\nfake line", 404)]
    first = records[0]
    assert first.levelno == logging.INFO and first.client == "testclient:50000" and first.duration_ms > 0
    assert first.getMessage() == f"POST /v1/chat/completions 200 {first.duration_ms:.1f} ms testclient:50000"
    assert "\n" not in records[3].getMessage()  # a path cannot forge a second log line


def test_serve_loads_without_progress_bars_and_without_uvicorns_access_log(adapter_a, monkeypatch, capfd) -> None:
    import uvicorn

    from loratune.infer.load import load_engine
    from loratune.infer.server import serve

    load_engine([str(adapter_a)])  # the same load outside `serve` does draw transformers' bar
    assert "Loading weights" in capfd.readouterr().err
    runs = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: runs.append(kw))
    serve([str(adapter_a)], port=0)
    out, err = capfd.readouterr()
    assert "Loading weights" not in err and "%|" not in err
    assert "loratune serve: models base, alpha" in out
    assert "; model: loratune's decoder (llama)" in out  # which model code answers, as training says it
    (kw,) = runs
    assert kw["access_log"] is False and kw["log_config"] is None
    load_engine([str(adapter_a)])  # the bars are only off while serve loads
    assert "Loading weights" in capfd.readouterr().err


def test_cli_batch_slots_make_a_batching_server(adapter_a, monkeypatch, capfd) -> None:
    import uvicorn

    from loratune.cli import main

    apps = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: apps.append(app))
    assert main(["serve", str(adapter_a), "--port", "0", "--batch-slots", "4", "--slot-tokens", "256"]) == 0
    batcher = apps[0].state.worker.batcher
    assert batcher.slots == 4 and batcher.capacity == 256 and batcher.decoder.cache.keys[0].shape[0] == 4
    assert main(["serve", str(adapter_a), "--port", "0"]) == 0
    assert apps[1].state.worker.batcher is None  # one request at a time by default
    assert main(["serve", str(adapter_a), "--port", "0", "--batch-slots", "0"]) == 2
    assert "--batch-slots must be >= 1" in capfd.readouterr().err
