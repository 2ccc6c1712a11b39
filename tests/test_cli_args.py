"""Command-line parsing: section.key=value overrides anywhere after CONFIG, for every config-driven subcommand."""

from __future__ import annotations

from pathlib import Path

import pytest

from loratune.cli import main, parse_args

ROOT = Path(__file__).parents[1]
QUICKSTART = str(ROOT / "examples" / "quickstart.yaml")


@pytest.mark.parametrize("argv, overrides", [
    (["plan", "c.yaml", "--device", "cuda", "train.batch_size=auto"], ["train.batch_size=auto"]),
    (["plan", "c.yaml", "a.b=1", "--device", "cuda", "c.d=2", "--budget-gib", "8", "a.b=3"],
     ["a.b=1", "c.d=2", "a.b=3"]),  # kept in line order: the last a.b wins in load_config
    (["plan", "--device", "cuda", "c.yaml", "a.b=1"], ["a.b=1"]),
    (["data", "preview", "c.yaml", "-n", "2", "data.max_length=64"], ["data.max_length=64"]),
    (["train", "c.yaml", "a.b=1", "c.d=2"], ["a.b=1", "c.d=2"]),
])
def test_overrides_anywhere_after_the_config(argv: list[str], overrides: list[str]) -> None:
    args = parse_args(argv)
    assert args.config == "c.yaml" and args.overrides == overrides
    if args.command == "plan":
        assert args.device == "cuda"
    if args.command == "data":
        assert args.n == 2


@pytest.mark.parametrize("argv, usage", [
    (["plan", "c.yaml", "--device", "cuda", "--bogus"], "usage: loratune plan"),
    (["chat", "demo://llama", "a.b=1"], "usage: loratune "),  # chat takes no overrides
])
def test_what_is_left_over_is_still_an_error(argv: list[str], usage: str, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as e:
        parse_args(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert usage in err and f"unrecognized arguments: {argv[-1]}" in err


def test_plan_applies_overrides_given_after_the_options(tiny_llama: Path, capsys: pytest.CaptureFixture) -> None:
    code = main(["plan", QUICKSTART, "--device", "cuda", "train.batch_size=auto", "--budget-gib", "8",
                 f"model.path={tiny_llama}", "data.max_length=128"])
    assert code == 0
    out = capsys.readouterr().out
    title = out.splitlines()[0]
    assert title.startswith(f"memory plan: {tiny_llama}, micro-batch ") and title.endswith(" x 128 tokens, padding-free, on cuda")
    assert "batch size: auto: " in out and "free: 8.00 GiB" in out
