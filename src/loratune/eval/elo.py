"""Elo ratings and win rates from pairwise games, as the QLoRA paper rates chatbots.

A game is two players and the first one's score: 1 (win), 0.5 (tie), 0 (loss). Elo plays the games in
order; after each, both ratings move by K x (score - expected), the expected score of A against B being
1 / (1 + 10^((R_B - R_A) / 400)). The result depends on the order of the games, so the paper plays them
in many random orders (10,000) from the same start (1000, K = 32) and reports the mean rating with the
spread over orderings. Here the orderings run side by side as one array per game (numpy), so 10,000
orderings of thousands of games take about a second.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Game:
    a: str
    b: str
    score: float  # a's: 1 win, 0.5 tie, 0 loss


def expected(ra: float, rb: float) -> float:
    """The expected score of a player rated ra against one rated rb."""
    return 1.0 / (1.0 + 10.0 ** ((rb - ra) / 400.0))


def elo(games: Sequence[Game], players: Sequence[str], *, k: float = 32.0, initial: float = 1000.0) -> dict[str, float]:
    """Ratings after playing `games` in the given order."""
    r = {p: initial for p in players}
    for g in games:
        e = expected(r[g.a], r[g.b])
        r[g.a] += k * (g.score - e)
        r[g.b] -= k * (g.score - e)
    return r


def tournament(games: Sequence[Game], players: Sequence[str], *, orderings: int = 10000, k: float = 32.0,
               initial: float = 1000.0, seed: int = 0, confidence: float = 0.95) -> dict[str, dict[str, float]]:
    """Per player: mean, median and interval of the final rating over `orderings` random orders of the games."""
    index = {p: i for i, p in enumerate(players)}
    a = np.array([index[g.a] for g in games], dtype=np.int64)
    b = np.array([index[g.b] for g in games], dtype=np.int64)
    s = np.array([g.score for g in games], dtype=np.float64)
    rng = np.random.default_rng(seed)
    block = max(1, 2_000_000 // max(1, len(games)))  # orderings at a time: bounded memory for long tournaments
    ratings = np.concatenate([_play(a, b, s, len(players), min(block, orderings - start), rng, k, initial)
                              for start in range(0, orderings, block)])
    alpha = (1 - confidence) / 2
    return {p: {"mean": float(ratings[:, i].mean()), "median": float(np.median(ratings[:, i])),
                "low": float(np.quantile(ratings[:, i], alpha)), "high": float(np.quantile(ratings[:, i], 1 - alpha))}
            for p, i in index.items()}


def _play(a: np.ndarray, b: np.ndarray, s: np.ndarray, players: int, orderings: int, rng: np.random.Generator,
          k: float, initial: float) -> np.ndarray:
    """Final ratings (orderings, players) of the games played in `orderings` random orders side by side."""
    ratings = np.full((orderings, players), initial, dtype=np.float64)
    rows = np.arange(orderings)
    order = np.argsort(rng.random((orderings, len(a))), axis=1)  # a random permutation per ordering
    for t in range(len(a)):
        g = order[:, t]
        ia, ib, sc = a[g], b[g], s[g]
        ra, rb = ratings[rows, ia], ratings[rows, ib]
        delta = k * (sc - 1.0 / (1.0 + 10.0 ** ((rb - ra) / 400.0)))
        ratings[rows, ia] = ra + delta
        ratings[rows, ib] = rb - delta
    return ratings


def win_rates(games: Sequence[Game], players: Sequence[str]) -> dict[str, dict[str, dict[str, float]]]:
    """rates[a][b]: a's wins, ties and losses against b, and a's score rate (a tie counts half)."""
    out = {p: {q: {"wins": 0, "ties": 0, "losses": 0} for q in players if q != p} for p in players}
    for g in games:
        for me, other, score in ((g.a, g.b, g.score), (g.b, g.a, 1.0 - g.score)):
            cell = out[me][other]
            cell["wins" if score == 1.0 else "ties" if score == 0.5 else "losses"] += 1
    for p in players:
        for q, cell in out[p].items():
            n = cell["wins"] + cell["ties"] + cell["losses"]
            cell["games"] = n
            cell["rate"] = (cell["wins"] + 0.5 * cell["ties"]) / n if n else float("nan")
    return out
