"""The Chat tab's loaded engine is reused while its adapters' files are unchanged and reloaded when a run
writes a new adapter (retrained while the page is open)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from loratune.infer import load as infer_load
from loratune.ui.paths import Workspace
from loratune.ui.tab_chat import Loaded, adapter_identity


@pytest.fixture
def ws(tmp_path: Path) -> Workspace:
    adapter = tmp_path / "ws" / "runs" / "a" / "adapter"
    adapter.mkdir(parents=True)
    (adapter / "adapter_config.json").write_text('{"r": 8}')
    (adapter / "adapter_model.safetensors").write_bytes(b"x" * 100)
    return Workspace.at(tmp_path / "ws")


def test_a_retrained_adapter_is_loaded_again(ws: Workspace, monkeypatch: pytest.MonkeyPatch):
    calls: list[list[str]] = []

    def fake_load(sources: list[str]) -> object:
        calls.append(list(sources))
        return object()

    monkeypatch.setattr(infer_load, "load_engine", fake_load)
    loaded = Loaded()
    first = loaded.load(ws, "demo://llama", ["runs/a/adapter"])
    assert loaded.load(ws, "demo://llama", ["runs/a/adapter"]) is first  # unchanged files: the same engine
    assert len(calls) == 1 and calls[0] == [f"runs-a-adapter={ws.root / 'runs/a/adapter'}"]

    weights = ws.root / "runs/a/adapter/adapter_model.safetensors"
    before = adapter_identity(weights.parent)
    weights.write_bytes(b"y" * 120)  # retrained: new size
    second = loaded.load(ws, "demo://llama", ["runs/a/adapter"])
    assert second is not first and len(calls) == 2

    st = weights.stat()  # same size, only a newer modification time
    weights.write_bytes(b"z" * 120)
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    assert adapter_identity(weights.parent) != before
    third = loaded.load(ws, "demo://llama", ["runs/a/adapter"])
    assert third is not second and len(calls) == 3

    config = ws.root / "runs/a/adapter/adapter_config.json"
    config.write_text('{"r": 16}')
    assert loaded.load(ws, "demo://llama", ["runs/a/adapter"]) is not third and len(calls) == 4
    assert loaded.load(ws, "demo://llama", ["runs/a/adapter"]) is loaded.engine and len(calls) == 4


def test_the_base_alone_is_cached_by_its_name(ws: Workspace, monkeypatch: pytest.MonkeyPatch):
    calls: list[list[str]] = []
    monkeypatch.setattr(infer_load, "load_engine", lambda sources: calls.append(list(sources)) or object())
    loaded = Loaded()
    engine = loaded.load(ws, "demo://llama", [])
    assert loaded.load(ws, "demo://llama", []) is engine and calls == [["demo://llama"]]
