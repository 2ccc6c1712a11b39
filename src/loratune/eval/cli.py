"""The `loratune eval` subcommand: `add_eval(sub)` adds it to the CLI's subparsers (one line in cli.COMMANDS).

Like every subcommand it parses its arguments and calls one library function (`run_eval`); the config
is read and validated before torch is imported, so a mistyped key fails in a moment.
"""

from __future__ import annotations

import argparse


def _eval(args: argparse.Namespace) -> int:
    from loratune.eval.config import load_eval_config

    cfg = load_eval_config(args.config, args.overrides)
    from loratune.eval.report import console_summary
    from loratune.eval.run import run_eval

    print(console_summary(run_eval(cfg)))
    return 0


def add_eval(sub: argparse._SubParsersAction) -> None:
    from loratune.cli import _config_args  # here, not at import: cli.py imports this module for its COMMANDS

    p = sub.add_parser("eval", help="Evaluate models side by side: benchmarks, generations, a judge, perplexity.",
                       description="Evaluate a base, adapter folders from `loratune train` and merged exports side by "
                                   "side, as an eval YAML file describes: multiple-choice benchmarks (MMLU's form, "
                                   "k-shot), generate-and-score (ROUGE, BLEU, exact match), a pairwise judge with Elo "
                                   "ratings, perplexity. Writes report.md and report.json to output.dir; a stopped "
                                   "eval run again continues where it stopped. Any key can be overridden as "
                                   "section.key=value, e.g. mc.0.shots=0.")
    _config_args(p, "eval YAML file (see loratune.eval.config for every key)")
    p.set_defaults(handler=_eval)
