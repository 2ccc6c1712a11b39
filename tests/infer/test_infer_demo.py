"""`demo://` names (the built-in offline models the help offers) work in `loratune chat` and `loratune serve`."""

from __future__ import annotations

from pathlib import Path

import pytest
from starlette.testclient import TestClient

from loratune.infer.engine import Delta
from loratune.infer.sampling import SamplingParams
from loratune.model.load import resolve_model_path


@pytest.fixture(scope="module")
def demo_answer() -> str:
    """The greedy answer of the demo model loaded from its cached folder, the reference for both commands."""
    from loratune.infer.load import load_engine

    folder = resolve_model_path("demo://llama-test")  # the tests' temporary cache (tests/conftest.py)
    eng = load_engine([folder])
    return "".join(e.text for e in eng.chat([{"role": "user", "content": "Hi"}], SamplingParams(max_new_tokens=6))
                   if isinstance(e, Delta))


def test_chat_accepts_a_demo_name(demo_answer: str, capsys) -> None:
    from loratune.cli import main

    assert main(["chat", "demo://llama-test", "--prompt", "Hi", "--temperature", "0", "--max-tokens", "6"]) == 0
    assert capsys.readouterr().out == demo_answer + "\n"


def test_serve_accepts_a_demo_name(demo_answer: str, monkeypatch, capsys) -> None:
    """`loratune serve demo://llama-test` loads the demo model and serves it as `base` (uvicorn.run is
    replaced by a recorder so the app can be driven in-process)."""
    import uvicorn

    from loratune.cli import main

    apps = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: apps.append((app, kw)))
    assert main(["serve", "demo://llama-test", "--port", "0"]) in (0, None)
    assert "models base on http://127.0.0.1:0/v1" in capsys.readouterr().out
    (app, _), = apps
    with TestClient(app) as client:
        assert [m["id"] for m in client.get("/v1/models").json()["data"]] == ["base"]
        r = client.post("/v1/chat/completions", json={"model": "base", "max_tokens": 6, "temperature": 0,
                                                      "messages": [{"role": "user", "content": "Hi"}]})
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["content"] == demo_answer


@pytest.mark.parametrize("command", ["chat", "serve"])
def test_unknown_demo_name_is_a_one_line_error(command: str, capsys) -> None:
    from loratune.cli import main

    args = [command, "demo://gpt9"] + (["--prompt", "x"] if command == "chat" else ["--port", "0"])
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: unknown demo model 'demo://gpt9'; known: demo://llama") and "\n" not in err


def test_demo_folder_is_built_once_in_the_cache() -> None:
    folder = Path(resolve_model_path("demo://llama-test"))
    assert (folder / "config.json").is_file() and folder.name == "llama-test-seed0"
