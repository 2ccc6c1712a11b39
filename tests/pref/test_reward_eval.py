"""`loratune eval` reward tasks: a trained reward model's pairwise accuracy on held-out pairs equals the count made
here from its scores (each answer scored alone, as serve scores it), with the Wilson interval of that count, the
mean margin, ties, truncated pairs and left-out identical pairs; the examples are the most confident right and
wrong pairs; a second run loads nothing, a stopped one scores only what is missing; a DPO policy is scored by its
implicit reward exactly as its training's evaluation scored the same pairs; bad configs are named."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from loratune.data.preference import read_pair
from loratune.data.readers import iter_file
from loratune.errors import ConfigError
from loratune.eval.config import load_eval_config
from loratune.eval.run import run_eval
from loratune.eval.stats import wilson
from loratune.pref.reward import pairwise_accuracy
from loratune.pref.scoring import RewardScorer
from loratune.train.metrics import read_rows
from loratune.train.run import train

PAIRS = Path(__file__).parents[2] / "examples" / "data" / "preference.jsonl"
LONG = "a long answer " * 80  # over the run's data.max_length (128): cut as training cuts it


@pytest.fixture(scope="module")
def pairs_file(reward_run: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    _, held = reward_run
    path = tmp_path_factory.mktemp("reward-eval") / "pairs.jsonl"
    extra = [{"prompt": "What is LoRA?", "chosen": "Low-rank adapters. " + LONG, "rejected": "I don't know."},
             {"prompt": "Same?", "chosen": "Yes.", "rejected": "Yes."}]  # identical answers: left out
    path.write_text(held.read_text() + "".join(json.dumps(r) + "\n" for r in extra))
    return path


@pytest.fixture(scope="module")
def by_hand(reward_run: tuple[Path, Path], pairs_file: Path) -> list[tuple[float, float]]:
    """(reward chosen, reward rejected) of every non-identical pair, each answer scored alone in its own batch."""
    scorer = RewardScorer.load(reward_run[0])
    out = []
    for rec in list(iter_file(pairs_file))[:-1]:
        p = read_pair(rec, None, None)
        chosen, rejected = (scorer.sample(p.prompt + [answer])[0] for answer in (p.chosen, p.rejected))
        out.append(tuple(scorer.rewards([chosen], 1) + scorer.rewards([rejected], 1)))
    return out


def _config(tmp_path: Path, folder: Path, pairs: Path, *overrides: str):
    path = tmp_path / "eval.yaml"
    path.write_text(json.dumps({
        "reward": [{"name": "heldout", "path": str(pairs),
                    "models": [{"name": "rm", "path": str(folder)}, {"name": "again", "path": str(folder)}]}],
        "output": {"dir": str(tmp_path / "eval"), "examples": 2, "plots": False}, "batch_size": 3}))
    return load_eval_config(path, list(overrides))


def test_accuracy_is_the_count_of_pairs_the_scores_order_right(tmp_path: Path, reward_run, pairs_file: Path,
                                                               by_hand) -> None:
    folder, _ = reward_run
    rep = run_eval(_config(tmp_path, folder, pairs_file))
    task = rep["reward"]["heldout"]
    assert task["records"] == 10 and task["identical"] == 1
    rm = task["models"]["rm"]
    margins = [c - r for c, r in by_hand]
    hits = sum(m > 0 for m in margins)
    assert rm["pairs"] == 9 and rm["correct"] == hits and hits >= 6
    assert rm["accuracy"] == wilson(hits, 9, 0.95).to_json()
    assert rm["margin"]["value"] == pytest.approx(sum(margins) / 9, abs=1e-4) and rm["margin"]["n"] == 9
    assert rm["ties"] == 0 and rm["truncated"] == 1 and rm["dropped"] == {}
    # the right examples: the largest margins first; the wrong ones: the most negative first
    right = sorted((m for m in margins if m > 0), reverse=True)[:2]
    wrong = sorted(m for m in margins if m <= 0)[:2]
    assert [e["margin"] for e in rm["examples"]["right"]] == pytest.approx(right, abs=1e-4)
    assert [e["margin"] for e in rm["examples"]["wrong"]] == pytest.approx(wrong, abs=1e-4)
    best = max(range(9), key=lambda i: margins[i])
    assert rm["examples"]["right"][0]["row"] == list(iter_file(pairs_file))[best].row
    # the same model under a second name: the same numbers, a difference of exactly 0
    assert task["models"]["again"]["accuracy"] == rm["accuracy"]
    assert task["differences"]["again"]["accuracy"]["value"] == 0.0
    # the 8 pairs of the training eval: what `loratune reward` reports
    assert pairwise_accuracy(folder, str(reward_run[1]))["accuracy"] == sum(m > 0 for m in margins[:8]) / 8
    md = (tmp_path / "eval" / "report.md").read_text()
    assert "## Reward models: heldout" in md and "### rm: most confident right" in md
    assert f"| pairwise accuracy | {rm['accuracy']['value']:.3f}" in md
    assert "1 more have the same chosen and rejected answers" in md


def test_a_rerun_loads_nothing_and_a_stopped_one_scores_what_is_missing(tmp_path: Path, reward_run, pairs_file: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    folder, _ = reward_run
    cfg = _config(tmp_path, folder, pairs_file)
    first = run_eval(cfg)["reward"]["heldout"]["models"]["rm"]
    cache = next((tmp_path / "eval" / "cache" / "rm").glob("reward-heldout-*.jsonl"))
    lines = cache.read_text().splitlines(keepends=True)
    assert len(lines) == 9
    loads = []
    real = RewardScorer.load.__func__

    def counted(cls, *args, **kwargs):
        loads.append(args)
        return real(cls, *args, **kwargs)

    monkeypatch.setattr(RewardScorer, "load", classmethod(counted))
    assert run_eval(cfg)["reward"]["heldout"]["models"]["rm"]["accuracy"] == first["accuracy"]
    assert loads == []  # everything came from the cache
    cache.write_text("".join(lines[:4]) + lines[4][:10])  # stopped after 4 pairs, mid-line
    again = run_eval(cfg)["reward"]["heldout"]["models"]["rm"]
    assert len(loads) == 1
    assert again["accuracy"] == first["accuracy"]
    assert again["margin"]["value"] == pytest.approx(first["margin"]["value"], abs=1e-5)
    assert len(cache.read_text().splitlines()) == 9
    # a changed pair file is scored again, under another cache key
    changed = tmp_path / "changed.jsonl"
    changed.write_text(pairs_file.read_text().replace("I don't know.", "No idea at all."))
    run_eval(_config(tmp_path, folder, changed))
    assert len(loads) == 2 and len(list((tmp_path / "eval" / "cache" / "rm").glob("reward-heldout-*.jsonl"))) == 2


def test_bad_reward_tasks_are_named(tmp_path: Path, reward_run, pairs_file: Path, tiny_llama: Path) -> None:
    folder, _ = reward_run
    with pytest.raises(ConfigError, match=r"reward\.0\.models: name at least one run to score the pairs"):
        _config(tmp_path, folder, pairs_file, "reward.0.models=[]")
    with pytest.raises(ConfigError, match="models: name at least one model to evaluate"):
        _config(tmp_path, folder, pairs_file, "reward=[]")
    with pytest.raises(ConfigError, match=r"reward\.0\.models: names must be unique"):
        _config(tmp_path, folder, pairs_file, "reward.0.models.1.name=rm")
    with pytest.raises(ConfigError, match=r"reward\.0\.models\.1\.path: .* is no run to score"):
        run_eval(_config(tmp_path, folder, pairs_file, f"reward.0.models.1.path={tiny_llama}"))
    assert not (tmp_path / "eval").exists()  # nothing loaded, nothing written


def test_a_dpo_policy_is_scored_by_its_implicit_reward_as_training_scored_it(tmp_path: Path, tiny_llama: Path,
                                                                            reward_run) -> None:
    from train_helpers import config, write_run_yaml

    held = reward_run[1]
    train_file = tmp_path / "train.jsonl"
    train_file.write_text("".join(PAIRS.read_text().splitlines(keepends=True)[:32]))
    path = write_run_yaml(tmp_path, tiny_llama, data={"datasets": [{"path": str(train_file)}],
                                                      "eval_datasets": [{"path": str(held)}], "eval_split": 0},
                          train={"method": "dpo", "optimizer": "adamw", "lr": 5e-3, "max_steps": 6, "eval_every": 6,
                                 "save_every": 0})
    run = train(config(path)).out_dir
    last = [r for r in read_rows(run / "metrics.jsonl") if "eval_loss" in r][-1]
    assert last["step"] == 6 and last["eval_margin"] != 0
    out = tmp_path / "eval.yaml"
    out.write_text(json.dumps({"reward": [{"name": "heldout", "path": str(held),
                                           "models": [{"name": "dpo", "path": str(run)}]}],
                               "output": {"dir": str(tmp_path / "eval"), "plots": False}}))
    dpo = run_eval(load_eval_config(out))["reward"]["heldout"]["models"]["dpo"]
    assert dpo["reward"] == "dpo: 0.1 x log-ratio to the base"
    assert dpo["pairs"] == 8 and dpo["accuracy"]["value"] == last["eval_accuracy"]
    assert dpo["margin"]["value"] == pytest.approx(last["eval_margin"], abs=1e-5)
    assert dpo["mean_reward_chosen"] == pytest.approx(last["eval_rewards_chosen"], abs=1e-5)
    assert dpo["mean_reward_rejected"] == pytest.approx(last["eval_rewards_rejected"], abs=1e-5)
