"""Atomic checkpoint folders, their manifests, rotation, and the state formats (no pickle anywhere)."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from loratune.train.checkpoint import (MANIFEST, checkpoint_name, clean_leftovers, complete_checkpoints,
                                       list_checkpoints, rotate, step_of, verify, write_checkpoint)
from loratune.train.trainer_state import load_rng_state, rng_state


def _fill(text: str):
    def fill(folder: Path) -> None:
        (folder / "a.txt").write_text(text)
        (folder / "sub").mkdir()
        (folder / "sub" / "b.bin").write_bytes(bytes(range(256)) * 4)
    return fill


def test_write_verify_and_list(tmp_path: Path) -> None:
    for step in (3, 10, 7):
        write_checkpoint(tmp_path, step, _fill(f"step {step}"))
    assert [step_of(p) for p in list_checkpoints(tmp_path)] == [10, 7, 3]
    assert all(verify(p) is None for p in list_checkpoints(tmp_path))
    manifest = json.loads((tmp_path / checkpoint_name(10) / MANIFEST).read_text())
    assert set(manifest["files"]) == {"a.txt", "sub/b.bin"} and manifest["step"] == 10
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


@pytest.mark.parametrize("damage", ["flip", "truncate", "no_manifest", "bad_manifest", "missing_file"])
def test_damaged_checkpoint_is_skipped_with_a_message(tmp_path: Path, damage: str) -> None:
    write_checkpoint(tmp_path, 3, _fill("old"))
    new = write_checkpoint(tmp_path, 6, _fill("new"))
    target = new / "sub" / "b.bin"
    if damage == "flip":
        data = bytearray(target.read_bytes())
        data[100] ^= 1
        target.write_bytes(bytes(data))
    elif damage == "truncate":
        target.write_bytes(target.read_bytes()[:10])
    elif damage == "no_manifest":
        (new / MANIFEST).unlink()
    elif damage == "bad_manifest":
        (new / MANIFEST).write_text("{not json")
    else:
        target.unlink()
    said: list[str] = []
    good = complete_checkpoints(tmp_path, said.append)
    assert [step_of(p) for p in good] == [3]
    assert len(said) == 1 and "skipping checkpoint" in said[0] and checkpoint_name(6) in said[0]


def test_a_failed_save_leaves_nothing(tmp_path: Path) -> None:
    write_checkpoint(tmp_path, 3, _fill("ok"))

    def broken(folder: Path) -> None:
        (folder / "a.txt").write_text("partial")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        write_checkpoint(tmp_path, 6, broken)
    assert [p.name for p in tmp_path.iterdir()] == [checkpoint_name(3)]


def test_rewriting_a_step_replaces_it(tmp_path: Path) -> None:
    write_checkpoint(tmp_path, 3, _fill("first"))
    folder = write_checkpoint(tmp_path, 3, _fill("second"))
    assert (folder / "a.txt").read_text() == "second" and verify(folder) is None


def test_rotation_keeps_the_newest_and_the_protected(tmp_path: Path) -> None:
    for step in (1, 2, 3, 4, 5):
        write_checkpoint(tmp_path, step, _fill(str(step)))
    rotate(tmp_path, keep_last=2, protect={tmp_path / checkpoint_name(2)})
    assert [step_of(p) for p in list_checkpoints(tmp_path)] == [5, 4, 2]
    rotate(tmp_path, keep_last=0)  # 0 keeps all
    assert len(list_checkpoints(tmp_path)) == 3


def test_leftovers_of_a_killed_save_are_cleaned(tmp_path: Path) -> None:
    write_checkpoint(tmp_path, 3, _fill("ok"))
    (tmp_path / ".tmp-step-00000006-123").mkdir()
    (tmp_path / ".trash-step-00000001-123").mkdir()
    clean_leftovers(tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == [checkpoint_name(3)]


def test_rng_state_round_trips_exactly() -> None:
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    tensors, meta = rng_state()
    json.dumps(meta)  # JSON, not pickle
    want = (random.random(), np.random.rand(), torch.rand(3))
    random.seed(9)
    np.random.seed(9)
    torch.manual_seed(9)
    load_rng_state(tensors, json.loads(json.dumps(meta)))
    got = (random.random(), np.random.rand(), torch.rand(3))
    assert got[0] == want[0] and got[1] == want[1] and torch.equal(got[2], want[2])
