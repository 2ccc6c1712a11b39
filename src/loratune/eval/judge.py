"""Pairwise judgments of model answers by a model behind any OpenAI-compatible chat API.

For every prompt and every pair of models, the judge sees the two answers twice, once in each order,
since judges favour one position; each judgment is one game for the Elo ratings (`loratune.eval.elo`).
The judge's prompt is a template the user can replace (`judge.template`): it gets `{question}`,
`{answer_a}` and `{answer_b}`, and must ask for a verdict `[[A]]`, `[[B]]` or `[[C]]` (a tie); the last
verdict in the reply counts, and a reply without one is counted as invalid and left out of the ratings.
Two identical answers are a tie without asking.

Each judgment is cached in the output folder under a hash of everything it depends on (the endpoint and
judge model, the template, the system message and temperature, the question and both answers in their
order), so a rerun asks only what is new: another model, a changed answer, another template. Requests
go out `concurrency` at a time, with retries and exponential backoff after timeouts, 429 and 5xx replies
(a `Retry-After` header is honoured). The API key is read from the environment, never from the config.
The client is the standard library's: no SDK is needed.
"""

from __future__ import annotations

import itertools
import json
import re
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from loratune.errors import ConfigError, LoratuneError
from loratune.eval.elo import Game
from loratune.eval.store import ResultStore, fingerprint
from loratune.eval.textdata import TextItem, question_text

DEFAULT_TEMPLATE = """\
You are comparing the answers of two AI assistants to the same user question. Decide which answer serves \
the user better: consider helpfulness, relevance, accuracy, depth and clarity. Judge the content only: \
the order in which the answers appear and their length must not sway you.

[Question]
{question}

[Answer A]
{answer_a}

[Answer B]
{answer_b}

Compare the two answers in a few sentences. Then write your verdict on the last line, exactly one of: \
[[A]] if answer A is better, [[B]] if answer B is better, [[C]] if they are equally good.
"""
PLACEHOLDERS = ("{question}", "{answer_a}", "{answer_b}")
VERDICT = re.compile(r"\[\[\s*([ABC])\s*\]\]", re.IGNORECASE)


class JudgeError(LoratuneError):
    """The judge endpoint failed in a way retrying does not fix (a bad key, an unknown model, no connection)."""


def load_template(path: str | None) -> str:
    if path is None:
        return DEFAULT_TEMPLATE
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"judge.template: no such file: {p}")
    text = p.read_text(encoding="utf-8")
    missing = [x for x in PLACEHOLDERS if x not in text]
    if missing:
        raise ConfigError(f"judge.template {p}: missing {', '.join(missing)}; the template must contain "
                          f"{', '.join(PLACEHOLDERS)}")
    return text


def render(template: str, question: str, answer_a: str, answer_b: str) -> str:
    """Fill the placeholders (plain replacement: braces elsewhere in the template stay as they are)."""
    out = template.replace("{question}", "\0q\0").replace("{answer_a}", "\0a\0").replace("{answer_b}", "\0b\0")
    return out.replace("\0q\0", question).replace("\0a\0", answer_a).replace("\0b\0", answer_b)


def parse_verdict(reply: str) -> str | None:
    """"A", "B" or "tie" from the last [[A]] / [[B]] / [[C]] of the reply; None when there is none."""
    found = VERDICT.findall(reply or "")
    if not found:
        return None
    return {"A": "A", "B": "B", "C": "tie"}[found[-1].upper()]


@dataclass
class JudgeClient:
    """`POST {base_url}/chat/completions` with retries."""

    base_url: str
    model: str
    api_key: str | None = None
    system: str | None = None
    temperature: float = 0.0
    max_tokens: int = 1024
    timeout: float = 120.0
    retries: int = 5
    sleep: Callable[[float], None] = time.sleep

    def identity(self) -> dict:
        """What a cached judgment depends on besides the prompt."""
        return {"base_url": self.base_url.rstrip("/"), "model": self.model, "system": self.system,
                "temperature": self.temperature, "max_tokens": self.max_tokens}

    def ask(self, prompt: str) -> str:
        messages = ([{"role": "system", "content": self.system}] if self.system else []) + [{"role": "user", "content": prompt}]
        body = json.dumps({"model": self.model, "messages": messages, "temperature": self.temperature,
                           "max_tokens": self.max_tokens}).encode("utf-8")
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        url = self.base_url.rstrip("/") + "/chat/completions"
        for attempt in range(self.retries + 1):
            request = urllib.request.Request(url, data=body, headers=headers, method="POST")
            try:
                with urllib.request.urlopen(request, timeout=self.timeout) as response:
                    return _content(json.loads(response.read().decode("utf-8")), url)
            except urllib.error.HTTPError as e:
                detail = _error_detail(e)
                if (e.code != 429 and e.code < 500) or attempt == self.retries:
                    raise JudgeError(f"judge at {url}: HTTP {e.code}: {detail}") from None
                after = _retry_after(e)
                wait = after if after is not None else min(60.0, 2.0 ** attempt)
            except (urllib.error.URLError, TimeoutError, ConnectionError) as e:
                if attempt == self.retries:
                    reason = getattr(e, "reason", e)
                    raise JudgeError(f"judge at {url}: no answer after {self.retries + 1} attempts: {reason}") from None
                wait = min(60.0, 2.0 ** attempt)
            self.sleep(wait)
        raise AssertionError("unreachable")


def _content(data: dict, url: str) -> str:
    try:
        content = data["choices"][0]["message"]["content"]
    except (KeyError, IndexError, TypeError):
        raise JudgeError(f"judge at {url}: the reply is not a chat completion (no choices[0].message.content): "
                         f"{json.dumps(data)[:200]}") from None
    return content or ""


def _error_detail(e: urllib.error.HTTPError) -> str:
    try:
        body = e.read().decode("utf-8", errors="replace")
        data = json.loads(body)
        return str((data.get("error") or {}).get("message") or data)[:300]
    except (ValueError, AttributeError, OSError):
        return str(e.reason)


def _retry_after(e: urllib.error.HTTPError) -> float | None:
    value = e.headers.get("Retry-After") if e.headers else None
    try:
        return min(60.0, float(value)) if value is not None else None
    except ValueError:
        return None


@dataclass(frozen=True)
class Judgment:
    prompt: str  # item id
    first: str  # model shown as answer A
    second: str  # model shown as answer B
    verdict: str | None  # "A", "B", "tie", or None when the reply had no verdict
    asked: bool  # False for identical answers (a tie without asking)


def judge(client: JudgeClient, template: str, items: Sequence[TextItem], answers: dict[str, dict[str, str]],
          players: Sequence[str], store: ResultStore, *, concurrency: int = 4,
          advance: Callable[[int], None] | None = None) -> list[Judgment]:
    """Every prompt x pair of players x both orders, from the cache where possible, else asked."""
    identity = client.identity()
    jobs: list[tuple[TextItem, str, str, str, str]] = []  # (item, first, second, key, prompt)
    out: dict[tuple[str, str, str], Judgment] = {}
    order = [(it, x, y) for it in items for p, q in itertools.combinations(players, 2) for x, y in ((p, q), (q, p))]
    for it, x, y in order:
        a, b = answers[x][it.id], answers[y][it.id]
        if a.strip() == b.strip():
            out[(it.id, x, y)] = Judgment(it.id, x, y, "tie", False)
            continue
        prompt = render(template, question_text(it), a, b)
        key = fingerprint(identity, prompt)
        cached = store.get(key)
        if cached is not None:
            out[(it.id, x, y)] = Judgment(it.id, x, y, parse_verdict(cached["reply"]), True)
        else:
            jobs.append((it, x, y, key, prompt))
    if advance is not None:
        advance(len(order) - len(jobs))
    lock = threading.Lock()

    def run(job: tuple[TextItem, str, str, str, str]) -> None:
        it, x, y, key, prompt = job
        reply = client.ask(prompt)
        with lock:
            store.add([{"id": key, "reply": reply, "prompt": it.id, "first": x, "second": y}])
            out[(it.id, x, y)] = Judgment(it.id, x, y, parse_verdict(reply), True)
            if advance is not None:
                advance(1)

    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        for f in [pool.submit(run, job) for job in jobs]:
            f.result()  # re-raises the first failure (the cached ones stay cached)
    return [out[(it.id, x, y)] for it, x, y in order]


def games(judgments: Sequence[Judgment]) -> list[Game]:
    """One game per judgment with a verdict (answer A's model is the game's first player)."""
    score = {"A": 1.0, "B": 0.0, "tie": 0.5}
    return [Game(j.first, j.second, score[j.verdict]) for j in judgments if j.verdict is not None]


def position_stats(judgments: Sequence[Judgment]) -> dict[str, float | int]:
    """How often the judge preferred the first position, and how often both orders of a pair agreed."""
    asked = [j for j in judgments if j.asked and j.verdict is not None]
    by_pair: dict[tuple[str, frozenset], list[Judgment]] = {}
    for j in judgments:
        by_pair.setdefault((j.prompt, frozenset((j.first, j.second))), []).append(j)
    winners = []
    for pair in by_pair.values():
        if len(pair) == 2 and all(j.verdict is not None for j in pair):
            w = [j.first if j.verdict == "A" else j.second if j.verdict == "B" else None for j in pair]
            winners.append(w[0] == w[1])
    return {"judgments": len(judgments), "asked": sum(j.asked for j in judgments),
            "invalid": sum(j.verdict is None for j in judgments),
            "first_position_wins": sum(j.verdict == "A" for j in asked) / len(asked) if asked else float("nan"),
            "second_position_wins": sum(j.verdict == "B" for j in asked) / len(asked) if asked else float("nan"),
            "orders_agree": sum(winners) / len(winners) if winners else float("nan"), "pairs": len(winners)}
