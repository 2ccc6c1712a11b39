"""Where model.path points: local paths fail as "no such folder", hub ids fail fast without the network."""

from __future__ import annotations

import http.server
import re
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import huggingface_hub
import pytest
from huggingface_hub import constants

from loratune.cli import main
from loratune.config import load_config
from loratune.errors import ModelError
from loratune.model.hub import Source, hub_unreachable, locate, looks_local
from loratune.model.load import load_base, load_tokenizer

ROOT = Path(__file__).parents[2]
QUICKSTART = str(ROOT / "examples" / "quickstart.yaml")


@pytest.mark.parametrize("path, local", [
    ("meta-llama/Llama-3.1-8B", False), ("gpt2", False), ("Qwen/Qwen2.5-7B-Instruct", False),
    ("./llama", True), ("../llama", True), ("/opt/models/llama", True), ("~/models/llama", True),
    ("models/llama/8b", True),  # more than one slash: no hub id has that
    ("my model", True), ("C:\\models\\llama", True), ("org--name/x", True),
    ("models/llama", True),  # ./models exists (made below): a local folder that lacks `llama`
    ("elsewhere/llama", False),  # a valid hub id and no ./elsewhere folder: the hub's
])
def test_what_counts_as_a_local_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, path: str, local: bool) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models").mkdir()
    assert looks_local(path) is local


def test_a_missing_local_folder_is_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models").mkdir()
    for path in ("./llama", "models/llama", str(tmp_path / "gone"), "~/surely-not-here-loratune/m"):
        with pytest.raises(ModelError, match=rf"^no such folder: {re.escape(path)}$"):
            locate(path)
    cfg = load_config(None, ["model.path=models/llama"])
    with pytest.raises(ModelError, match=r"^no such folder: models/llama$"):
        load_base(cfg)
    with pytest.raises(ModelError, match=r"^no such folder: models/llama$"):
        load_tokenizer(cfg.model)


def test_an_existing_folder_is_handed_over_as_is(tiny_llama: Path) -> None:
    assert locate(str(tiny_llama)) == Source(str(tiny_llama), local_files_only=False)


@pytest.fixture
def empty_hub_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    return cache


def _cache_config(cache: Path, repo_id: str, config: Path) -> None:
    """A hub cache entry as huggingface_hub writes it: refs/main -> snapshots/COMMIT/config.json."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    commit = "0" * 40
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    (repo / "snapshots" / commit).mkdir(parents=True)
    shutil.copy(config, repo / "snapshots" / commit / "config.json")


def test_offline_and_not_cached_fails_at_once(empty_hub_cache: Path) -> None:
    assert huggingface_hub.is_offline_mode()  # tests/conftest.py sets HF_HUB_OFFLINE
    start = time.monotonic()
    with pytest.raises(ModelError, match=r"'huggyllama/llama-7b' is a hub id that is not in the local cache, and "
                                         r"the hub is off \(HF_HUB_OFFLINE is set\)\. Download it .*"
                                         r"`hf download huggyllama/llama-7b`"):
        locate("huggyllama/llama-7b")
    assert time.monotonic() - start < 1


def test_offline_and_cached_is_left_to_transformers(empty_hub_cache: Path, tiny_llama: Path) -> None:
    _cache_config(empty_hub_cache, "org/tiny", tiny_llama / "config.json")
    assert locate("org/tiny") == Source("org/tiny", local_files_only=False)


@pytest.fixture
def online(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    hub_unreachable.cache_clear()
    yield
    hub_unreachable.cache_clear()


def test_unreachable_hub_fails_fast_or_uses_the_cache(online: None, empty_hub_cache: Path, tiny_llama: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # nothing listens on the discard port
    start = time.monotonic()
    with pytest.raises(ModelError, match=r"the hub cannot be reached \(http://127\.0\.0\.1:9: ConnectError"):
        locate("huggyllama/llama-7b")
    assert time.monotonic() - start < 5  # one attempt, not the 30 s of retries
    _cache_config(empty_hub_cache, "org/tiny", tiny_llama / "config.json")
    assert locate("org/tiny") == Source("org/tiny", local_files_only=True)


def test_a_reachable_hub_is_asked(online: None, empty_hub_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), http.server.BaseHTTPRequestHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{server.server_address[1]}")
        assert hub_unreachable(constants.ENDPOINT) is None  # it answered (501: no HEAD handler), so it is there
        assert locate("huggyllama/llama-7b") == Source("huggyllama/llama-7b", local_files_only=False)
    finally:
        server.shutdown()
        server.server_close()


def _plan_table(capsys: pytest.CaptureFixture, path: str) -> list[str]:
    assert main(["plan", QUICKSTART, f"model.path={path}", "--device", "cuda", "--budget-gib", "80"]) == 0
    return capsys.readouterr().out.splitlines()[1:]  # the title names the path


def test_plan_takes_a_bare_config_json(tmp_path: Path, tiny_llama: Path, capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "only").mkdir()
    shutil.copy(tiny_llama / "config.json", tmp_path / "only" / "config.json")
    table = _plan_table(capsys, str(tiny_llama))
    assert any(line.split()[:2] == ["decoder", "weights"] for line in table)
    assert _plan_table(capsys, str(tmp_path / "only" / "config.json")) == table
    assert _plan_table(capsys, str(tmp_path / "only")) == table
    with pytest.raises(ModelError, match=r"is a file; give the model's folder"):
        load_base(load_config(None, [f"model.path={tmp_path / 'only' / 'config.json'}"]))
