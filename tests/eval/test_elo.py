"""Elo against hand-computed games, the tournament over orderings, and the win-rate matrix."""

from __future__ import annotations

import pytest

from loratune.eval.elo import Game, elo, expected, tournament, win_rates

# B beating A after A beat B: E_B = 1 / (1 + 10^((1016 - 984) / 400)) = 1 / (1 + 10^0.08) = 0.4540781;
# B gains 32 x (1 - 0.4540781) = 17.4695.
SWING = 32 * (1 - 1 / (1 + 10 ** 0.08))


def test_expected_score() -> None:
    assert expected(1000, 1000) == 0.5
    assert expected(1400, 1000) == pytest.approx(10 / 11)  # 1 / (1 + 10^-1)


def test_two_games_by_hand() -> None:
    games = [Game("A", "B", 1.0), Game("A", "B", 0.0)]
    r = elo(games, ["A", "B"])
    assert SWING == pytest.approx(17.4695, abs=1e-4)
    assert r["A"] == pytest.approx(998.5305, abs=1e-4)
    assert r["B"] == pytest.approx(1001.4695, abs=1e-4)


def test_three_players_with_a_tie_by_hand() -> None:
    # A-B tie: expected 0.5 each, no change. C beats A: C 1016, A 984. B beats C:
    # E_B = 1 / (1 + 10^(16/400)) = 0.4769904, B gains 32 x 0.5230096 = 16.7363.
    r = elo([Game("A", "B", 0.5), Game("C", "A", 1.0), Game("B", "C", 1.0)], ["A", "B", "C"])
    assert r == pytest.approx({"A": 984.0, "B": 1016.7363, "C": 999.2637}, abs=1e-4)


def test_tournament_spans_both_orderings() -> None:
    # Two games have two orderings: A ends at 998.53 (win first) or 1001.47 (loss first), equally likely.
    games = [Game("A", "B", 1.0), Game("B", "A", 1.0)]
    t = tournament(games, ["A", "B"], orderings=4000, seed=0)
    assert t["A"]["low"] == pytest.approx(1016 - SWING)
    assert t["A"]["high"] == pytest.approx(984 + SWING)
    assert t["A"]["mean"] == pytest.approx(1000.0, abs=0.3)  # half of each, within sampling noise
    assert t["A"]["mean"] + t["B"]["mean"] == pytest.approx(2000.0)  # Elo conserves the total


def test_tournament_is_seeded_and_ranks_the_better_player_first() -> None:
    games = [Game("strong", "weak", 1.0)] * 6 + [Game("weak", "strong", 1.0)] * 2 + [Game("mid", "weak", 0.5)] * 4
    a = tournament(games, ["strong", "mid", "weak"], orderings=500, seed=3)
    b = tournament(games, ["strong", "mid", "weak"], orderings=500, seed=3)
    assert a == b
    assert a["strong"]["mean"] > a["mid"]["mean"] > a["weak"]["mean"]
    for p in a.values():
        assert p["low"] <= p["median"] <= p["high"]


def test_win_rates_count_ties_half() -> None:
    games = [Game("A", "B", 1.0), Game("B", "A", 0.5), Game("B", "A", 1.0), Game("A", "C", 0.0)]
    w = win_rates(games, ["A", "B", "C"])
    assert w["A"]["B"] == {"wins": 1, "ties": 1, "losses": 1, "games": 3, "rate": 0.5}
    assert w["B"]["A"]["rate"] == 0.5
    assert w["C"]["A"] == {"wins": 1, "ties": 0, "losses": 0, "games": 1, "rate": 1.0}
    assert w["B"]["C"]["games"] == 0
