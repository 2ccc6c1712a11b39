"""The UI's server: loopback by default, a token elsewhere, capped bodies, no workspace file through any URL."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from loratune.ui.paths import MAX_BODY_BYTES, WorkspaceError
from loratune.ui.server import is_loopback, make_app, serve_ui


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> tuple[TestClient, Path]:
    base = tmp_path_factory.mktemp("site")
    ws = base / "ws"
    (ws / "data").mkdir(parents=True)
    (ws / "data" / "a.jsonl").write_text('{"text": "inside"}\n')
    (base / "secret.txt").write_text("outside")
    os.symlink(base / "secret.txt", ws / "link.txt")
    return TestClient(make_app(ws)), ws


def test_loopback_detection():
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost") and is_loopback("127.0.0.2")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.5") and not is_loopback("example.org")


def test_another_address_needs_a_token(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.delenv("LORATUNE_UI_TOKEN", raising=False)
    with pytest.raises(WorkspaceError, match="--host 0.0.0.0 is reachable from other machines: set --token"):
        serve_ui(host="0.0.0.0", port=1, workspace=str(tmp_path))


def test_the_page_is_served(site):
    client, _ = site
    r = client.get("/")
    assert r.status_code == 200 and "gradio" in r.text.lower()


@pytest.mark.parametrize("url", [
    "/gradio_api/file={ws}/data/a.jsonl", "/gradio_api/file={ws}/link.txt", "/gradio_api/file={ws}/../secret.txt",
    "/gradio_api/file=../secret.txt", "/gradio_api/file=/etc/passwd", "/gradio_api/file=%2e%2e/secret.txt",
    "/gradio_api/file={ws}/%2e%2e/secret.txt", "/gradio_api/file={ws}%2F..%2Fsecret.txt",
    "/gradio_api/file=%252e%252e/secret.txt", "/file={ws}/data/a.jsonl", "/gradio_api/file={ws}/data/..%2f..%2fsecret.txt",
    "/gradio_api/file=pyproject.toml", "/gradio_api/file=./README.md",
])
def test_no_file_through_a_url(site, url: str):
    client, ws = site
    r = client.get(url.format(ws=ws))
    assert r.status_code in (400, 403, 404, 405), (url, r.status_code)
    assert "inside" not in r.text and "outside" not in r.text


def test_request_bodies_are_capped(site):
    client, _ = site
    r = client.post("/gradio_api/queue/join", content=b"x" * (MAX_BODY_BYTES + 1),
                    headers={"content-type": "application/json"})
    assert r.status_code == 413

    def chunks():  # no Content-Length: counted as it arrives
        for _ in range(MAX_BODY_BYTES // 65536 + 2):
            yield b"x" * 65536

    r = client.post("/gradio_api/queue/join", content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413


def test_a_token_is_asked_for(tmp_path: Path):
    client = TestClient(make_app(tmp_path, token="s3cret"))
    assert client.get("/config").status_code in (401, 403)
    assert client.post("/login", data={"username": "me", "password": "wrong"}).status_code in (400, 401)
    ok = client.post("/login", data={"username": "me", "password": "s3cret"})
    assert ok.status_code == 200, ok.text
    assert client.get("/config").status_code == 200
    assert re.search(r"loratune", client.get("/config").text)
