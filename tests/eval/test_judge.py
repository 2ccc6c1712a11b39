"""The judge against a scripted OpenAI-compatible server: both orders, verdicts, caching, retries, errors."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from fake_openai import FakeJudge  # noqa: E402

from loratune.errors import ConfigError  # noqa: E402
from loratune.eval.elo import Game  # noqa: E402
from loratune.eval.judge import (DEFAULT_TEMPLATE, JudgeClient, JudgeError, games, judge, load_template,  # noqa: E402
                                 parse_verdict, position_stats, render)
from loratune.eval.store import ResultStore  # noqa: E402
from loratune.eval.textdata import TextItem  # noqa: E402

ITEMS = [TextItem(str(i), ({"role": "user", "content": q},), None, "p.jsonl", i + 1)
         for i, q in enumerate(["Name a colour.", "Say hi."])]
ANSWERS = {"base": {"0": "red", "1": "hi"},
           "tuned": {"0": "a good colour is blue", "1": "hi"},  # identical to base on prompt 1
           "other": {"0": "green", "1": "good day to you"}}


def _client(fake: FakeJudge, **kw) -> JudgeClient:
    return JudgeClient(fake.url, "judge-model", api_key="s3cret", sleep=lambda s: None, **kw)


def test_every_pair_in_both_orders_and_the_verdicts_map_back(tmp_path: Path) -> None:
    with FakeJudge() as fake:
        got = judge(_client(fake), DEFAULT_TEMPLATE, ITEMS, ANSWERS, ["base", "tuned", "other"],
                    ResultStore(tmp_path / "j.jsonl"), concurrency=3)
    assert len(got) == 2 * 3 * 2  # prompts x pairs x orders
    assert len(fake.requests) == 10  # base and tuned answered prompt 1 alike: a tie in both orders, not asked
    assert {r["auth"] for r in fake.requests} == {"Bearer s3cret"}
    assert {r["path"] for r in fake.requests} == {"/v1/chat/completions"}
    assert fake.requests[0]["body"]["model"] == "judge-model"
    by = {(j.prompt, j.first, j.second): j for j in got}
    assert by[("0", "base", "tuned")].verdict == "B" and by[("0", "tuned", "base")].verdict == "A"
    assert by[("0", "base", "other")].verdict == "tie"
    assert by[("1", "base", "tuned")].verdict == "tie" and not by[("1", "base", "tuned")].asked
    g = games(got)
    assert Game("base", "tuned", 0.0) in g and Game("tuned", "base", 1.0) in g and Game("other", "base", 1.0) in g
    stats = position_stats(got)
    assert stats["orders_agree"] == 1.0 and stats["invalid"] == 0 and stats["asked"] == 10


def test_a_rerun_asks_only_what_changed(tmp_path: Path) -> None:
    store = tmp_path / "j.jsonl"
    with FakeJudge() as fake:
        judge(_client(fake), DEFAULT_TEMPLATE, ITEMS, ANSWERS, ["base", "tuned"], ResultStore(store))
        assert len(fake.requests) == 2
        again = judge(_client(fake), DEFAULT_TEMPLATE, ITEMS, ANSWERS, ["base", "tuned"], ResultStore(store))
        assert len(fake.requests) == 2  # everything came from the cache
        assert [j.verdict for j in again] == ["B", "A", "tie", "tie"]
        changed = {**ANSWERS, "tuned": {**ANSWERS["tuned"], "1": "hello"}}
        judge(_client(fake), DEFAULT_TEMPLATE, ITEMS, changed, ["base", "tuned"], ResultStore(store))
        assert len(fake.requests) == 4  # only prompt 1, in both orders
        judge(_client(fake, temperature=0.5), DEFAULT_TEMPLATE, ITEMS, ANSWERS, ["base", "tuned"], ResultStore(store))
        assert len(fake.requests) == 6  # another judge setting is another judgment


def test_retries_after_429_and_5xx_then_fails_clearly(tmp_path: Path) -> None:
    waits: list[float] = []
    with FakeJudge() as fake:
        fake.fail_next = [429, 503]
        client = JudgeClient(fake.url, "m", sleep=waits.append, retries=2)
        assert parse_verdict(client.ask(render(DEFAULT_TEMPLATE, "q", "good", "bad"))) == "A"
        assert waits == [0.0, 2.0]  # Retry-After: 0, then backoff 2^1
        assert fake.requests[0]["auth"] is None  # no key in the environment: no header
        fake.fail_next = [500, 500, 500]
        with pytest.raises(JudgeError, match=r"HTTP 500: scripted failure 500"):
            client.ask("x")
        fake.fail_next = [401]
        before = len(fake.requests)
        with pytest.raises(JudgeError, match=r"judge at http://127.0.0.1:\d+/v1/chat/completions: HTTP 401"):
            client.ask("x")
        assert len(fake.requests) == before + 1  # a client error is not retried


def test_unreachable_endpoint() -> None:
    client = JudgeClient("http://127.0.0.1:9/v1", "m", retries=1, timeout=2, sleep=lambda s: None)
    with pytest.raises(JudgeError, match="no answer after 2 attempts"):
        client.ask("x")


def test_unparseable_replies_are_invalid_not_games(tmp_path: Path) -> None:
    answers = {"a": {"0": "mumble", "1": "x"}, "b": {"0": "y", "1": "good"}}
    with FakeJudge() as fake:
        got = judge(_client(fake), DEFAULT_TEMPLATE, ITEMS, answers, ["a", "b"], ResultStore(tmp_path / "j.jsonl"))
    assert [j.verdict for j in got] == [None, None, "B", "A"]
    assert games(got) == [Game("a", "b", 0.0), Game("b", "a", 1.0)]
    assert position_stats(got)["invalid"] == 2


def test_verdicts_and_templates(tmp_path: Path) -> None:
    assert parse_verdict("[[A]] ... on reflection [[b]]") == "B"
    assert parse_verdict("equal: [[ C ]]") == "tie"
    assert parse_verdict("no idea") is None
    custom = tmp_path / "t.txt"
    custom.write_text('Q: {question}\nA: {answer_a}\nB: {answer_b}\nJSON like {"k": 1} stays. [[A]]/[[B]]/[[C]]')
    assert render(load_template(str(custom)), "q?", "x", "y") == 'Q: q?\nA: x\nB: y\nJSON like {"k": 1} stays. [[A]]/[[B]]/[[C]]'
    assert render("{answer_a}|{answer_b}", "", "{answer_b}", "z") == "{answer_b}|z"  # answers are not re-expanded
    custom.write_text("Q: {question} A: {answer_a}")
    with pytest.raises(ConfigError, match=r"missing \{answer_b\}"):
        load_template(str(custom))
