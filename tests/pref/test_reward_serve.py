"""`loratune serve --reward`: POST /v1/rewards through the ASGI app. A trained reward model scores held-out pairs as
training measured them (the pairwise accuracy and mean margin of `pairwise_accuracy`, counted here from the served
scores), a batched request gives the scores of single ones, the prompt/completion form the scores of the same
conversations, and every bad request is an OpenAI-shaped JSON error naming what is wrong."""

from __future__ import annotations

from pathlib import Path

import pytest
from starlette.testclient import TestClient

from loratune.data.preference import read_pair
from loratune.errors import LoratuneError
from loratune.data.readers import iter_file
from loratune.infer.load import load_engine
from loratune.infer.reward_api import load_reward_models
from loratune.infer.server import create_app
from loratune.pref.reward import pairwise_accuracy


@pytest.fixture(scope="module")
def served(reward_run: tuple[Path, Path]):
    folder, held = reward_run
    scorers = load_reward_models([f"rm={folder}"])
    app = create_app(load_engine([str(folder)], implementation=None), rewards=scorers)
    with TestClient(app) as client:
        yield client, folder, held, scorers["rm"]


def _pairs(held: Path) -> list:
    return [read_pair(r, None, None) for r in iter_file(held)]


def _post(client: TestClient, body: dict):
    return client.post("/v1/rewards", json=body)


def test_served_scores_give_the_pairwise_accuracy_training_measures(served) -> None:
    client, folder, held, _ = served
    pairs = _pairs(held)
    conversations = [c for p in pairs for c in (p.prompt + [p.chosen], p.prompt + [p.rejected])]
    r = _post(client, {"model": "rm", "messages": conversations})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "list" and body["model"] == "rm"
    assert [d["index"] for d in body["data"]] == list(range(16))
    scores = [d["score"] for d in body["data"]]
    chosen, rejected = scores[0::2], scores[1::2]
    hits = sum(c > r for c, r in zip(chosen, rejected))
    want = pairwise_accuracy(folder, str(held))
    assert want["pairs"] == 8
    assert hits / 8 == want["accuracy"] and hits >= 6  # the fixture's model is right on at least 6 of 8
    assert sum(c - r for c, r in zip(chosen, rejected)) / 8 == pytest.approx(want["margin"], abs=1e-4)
    assert body["usage"]["prompt_tokens"] == sum(d["tokens"] for d in body["data"]) > 16
    assert not any(d["truncated"] for d in body["data"])
    # one conversation alone: the same score as inside the batch (padding does not change a reward)
    single = _post(client, {"model": "rm", "messages": conversations[3]}).json()
    assert len(single["data"]) == 1 and single["data"][0]["score"] == pytest.approx(scores[3], abs=1e-5)


def test_prompt_and_completion_lists_score_as_the_conversations(served) -> None:
    client, _, _, _ = served
    prompt, answers = "What is a token?", ["A token is a piece of text.", "No idea."]
    as_pairs = _post(client, {"model": "rm", "prompt": prompt, "completion": answers}).json()["data"]
    as_messages = _post(client, {"model": "rm", "messages": [
        [{"role": "user", "content": prompt}, {"role": "assistant", "content": a}] for a in answers]}).json()["data"]
    assert [d["score"] for d in as_pairs] == pytest.approx([d["score"] for d in as_messages], abs=1e-6)
    assert as_pairs[0]["score"] != as_pairs[1]["score"]
    one = _post(client, {"model": "rm", "prompt": [prompt], "completion": answers[1]}).json()["data"]
    assert len(one) == 1 and one[0]["score"] == pytest.approx(as_pairs[1]["score"], abs=1e-6)


@pytest.mark.parametrize(("body", "status", "param", "words"), [
    ({"model": "nope", "prompt": "q", "completion": "a"}, 404, "model", "reward models: rm"),
    ({"model": "rm", "messages": [{"role": "user", "content": "Hi"}]}, 400, "messages", "ends with user"),
    ({"model": "rm", "messages": [[{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}],
                                  [{"role": "assistant", "content": "Yo"}, {"role": "user", "content": "Hi"}]]},
     400, "messages.1", "ends with user"),
    ({"model": "rm", "prompt": "q"}, 400, None, "either `messages`"),
    ({"model": "rm", "completion": "a"}, 400, None, "needs a `prompt`"),
    ({"model": "rm", "prompt": "q", "completion": "a", "messages": [{"role": "user", "content": "q"}]}, 400, None,
     "either `messages`"),
    ({"model": "rm", "prompt": ["a", "b", "c"], "completion": ["x", "y"]}, 400, "prompt", "3 prompts for 2"),
    ({"model": "rm", "prompt": "q", "completion": []}, 400, "completion", "nothing to score"),
    ({"model": "rm", "prompt": "q", "completion": ["a"] * 65}, 413, None, "65 items"),
    ({"model": "rm", "prompt": "q", "completion": 3}, 400, "completion", "valid"),
])
def test_bad_requests_are_json_errors_naming_the_problem(served, body: dict, status: int, param: str | None,
                                                         words: str) -> None:
    client, _, _, _ = served
    r = _post(client, body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert words in err["message"] and err["param"] == param


def test_too_long_conversations_are_named(served) -> None:
    client, _, _, scorer = served
    long = "word " * 400  # the run's data.max_length is 128; its truncation policy decides drop or cut
    r = _post(client, {"model": "rm", "prompt": "q", "completion": ["fine", long]})
    assert scorer.cfg.data.max_length == 128
    if scorer.cfg.data.truncation == "drop":
        assert r.status_code == 400 and r.json()["error"]["param"] == "completion.1"
        assert "longer than the reward model's data.max_length 128" in r.json()["error"]["message"]
    else:
        data = r.json()["data"]
        assert [d["truncated"] for d in data] == [False, True] and data[1]["tokens"] == 128


def test_no_reward_models_served_says_how_to_add_one(served) -> None:
    _, folder, _, _ = served
    with TestClient(create_app(load_engine([str(folder)], implementation=None))) as client:
        r = _post(client, {"model": "rm", "prompt": "q", "completion": "a"})
    assert r.status_code == 404 and "--reward NAME=RUN" in r.json()["error"]["message"]


def test_the_cli_passes_reward_models_to_serve(monkeypatch: pytest.MonkeyPatch) -> None:
    import loratune.infer.server as server
    from loratune.cli import main

    seen = {}
    monkeypatch.setattr(server, "serve", lambda sources, **kw: seen.update(sources=sources, **kw))
    assert main(["serve", "outputs/chat", "--reward", "rm=outputs/rm", "--reward", "outputs/rm2"]) == 0
    assert seen["sources"] == ["outputs/chat"] and seen["rewards"] == ["rm=outputs/rm", "outputs/rm2"]


def test_bad_reward_model_specs_are_named(reward_run: tuple[Path, Path], tmp_path: Path) -> None:
    folder, _ = reward_run
    with pytest.raises(LoratuneError, match="the name 'rm' is taken"):
        load_reward_models([f"rm={folder}", f"rm={folder}"])
    with pytest.raises(LoratuneError, match="the name before '=' is empty"):
        load_reward_models([f"={folder}"])
    with pytest.raises(LoratuneError, match="is not a run written by `loratune train`"):
        load_reward_models([f"rm={tmp_path}"])
