"""What counts as a changed config when resuming: a key an older loratune did not write is no change at its default."""

from __future__ import annotations

import copy

from loratune.config import Config, to_dict
from loratune.train.resume import config_diff


def _config() -> dict:
    cfg = Config()
    cfg.model.path = "demo://llama"
    return to_dict(cfg)


def test_a_key_missing_from_an_older_checkpoint_is_no_change_at_its_default() -> None:
    new = _config()
    old = copy.deepcopy(new)
    del old["train"]["method"]  # written before train.method existed
    del old["train"]["batching"]
    assert config_diff(old, new) == []


def test_a_missing_key_set_to_something_else_is_a_change() -> None:
    new = _config()
    old = copy.deepcopy(new)
    del old["train"]["method"]
    new["train"]["method"] = "dpo"
    assert config_diff(old, new) == ['  train.method: (absent) -> "dpo"']


def test_changed_and_removed_keys_are_reported() -> None:
    new = _config()
    old = copy.deepcopy(new)
    old["train"]["lr"] = 1e-3
    old["train"]["no_longer_a_key"] = 3
    assert config_diff(old, new) == ["  train.lr: 0.001 -> 0.0002", "  train.no_longer_a_key: 3 -> (absent)"]


def test_the_benchmark_scored_during_training_may_change_on_resume() -> None:
    new = _config()
    old = copy.deepcopy(new)
    new["train"]["eval_benchmark"]["path"] = "mmlu/"
    new["train"]["eval_benchmark"]["shots"] = 0
    assert config_diff(old, new) == []


def test_a_flipped_kto_label_changes_the_data_fingerprint() -> None:
    from loratune.data.preference import PreferenceSample
    from loratune.train.resume import data_fingerprint

    def kto(desirable: bool | None) -> PreferenceSample:
        return PreferenceSample(input_ids=[1, 2, 3], labels=[-100, 2, 3], position_ids=[0, 1, 2], desirable=desirable)

    assert data_fingerprint([kto(True)]) != data_fingerprint([kto(False)])
    assert data_fingerprint([kto(True)]) == data_fingerprint([kto(True)])
    assert data_fingerprint([kto(None)]) != data_fingerprint([kto(True)])
