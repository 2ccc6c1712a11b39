"""The UI's path gate: nothing outside the workspace through `..`, absolute paths, symlinks or encodings."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from loratune.ui.paths import MAX_PATH_CHARS, Workspace, WorkspaceError, check_text


@pytest.fixture
def ws(tmp_path: Path) -> Workspace:
    root = tmp_path / "ws"
    (root / "data").mkdir(parents=True)
    (root / "data" / "a.jsonl").write_text("{}\n")
    (tmp_path / "secret.txt").write_text("no")
    os.symlink(tmp_path / "secret.txt", root / "link-out.txt")
    os.symlink(tmp_path, root / "dir-out")
    os.symlink(root / "data" / "a.jsonl", root / "link-in.jsonl")
    return Workspace.at(root)


def test_inside_paths_resolve(ws: Workspace):
    assert ws.resolve("data/a.jsonl", kind="file") == ws.root / "data" / "a.jsonl"
    assert ws.resolve(str(ws.root / "data"), kind="dir") == ws.root / "data"
    assert ws.resolve("data/../data/./a.jsonl") == ws.root / "data" / "a.jsonl"
    assert ws.resolve("link-in.jsonl", kind="file") == ws.root / "data" / "a.jsonl"
    assert ws.resolve("new/run") == ws.root / "new" / "run"  # an output folder need not exist yet
    assert ws.resolve("%2e%2e/secret.txt") == ws.root / "%2e%2e" / "secret.txt"  # a literal name, inside


@pytest.mark.parametrize("value", ["..", "../secret.txt", "data/../../secret.txt", "/etc/passwd", "/",
                                   "link-out.txt", "dir-out/secret.txt", "dir-out", "~/x", "~root",
                                   "data/" + "../" * 40 + "etc/passwd"])
def test_escapes_are_refused(ws: Workspace, value: str):
    with pytest.raises(WorkspaceError, match="outside the workspace|home-folder"):
        ws.resolve(value, "data.datasets")


def test_absolute_path_to_a_sibling_with_the_same_prefix_is_refused(ws: Workspace, tmp_path: Path):
    (tmp_path / "ws2").mkdir()
    with pytest.raises(WorkspaceError, match="outside"):
        ws.resolve(str(tmp_path / "ws2"))


@pytest.mark.parametrize("value,message", [("", "empty"), ("  ", "empty"), ("a\x00b", "NUL"),
                                           ("a" * (MAX_PATH_CHARS + 1), "more than")])
def test_bad_values(ws: Workspace, value: str, message: str):
    with pytest.raises(WorkspaceError, match=message):
        ws.resolve(value, "output.dir")


def test_sources(ws: Workspace):
    assert ws.source("demo://llama", "model.path") == "demo://llama"
    assert ws.source("meta-llama/Llama-3.2-1B", "model.path") == "meta-llama/Llama-3.2-1B"  # a hub id
    assert ws.source("data/a.jsonl", "data.datasets") == str(ws.root / "data" / "a.jsonl")  # a local folder wins
    for bad in ("demo://../../etc", "../secret.txt", "dir-out/secret.txt", "/etc", "data/missing.jsonl",
                "dir-out/x"):
        with pytest.raises(WorkspaceError):
            ws.source(bad, "model.path")


def test_listing_stays_inside(ws: Workspace):
    files = ws.files((".jsonl", ".txt"))
    assert "data/a.jsonl" in files and "link-in.jsonl" in files
    assert "link-out.txt" not in files and not any(f.startswith("dir-out") for f in files)


def test_text_limits():
    assert check_text("hi", "prompt") == "hi"
    with pytest.raises(WorkspaceError, match="prompt: 20,001 characters"):
        check_text("x" * 20_001, "prompt")
