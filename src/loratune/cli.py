"""The `loratune` command: each subcommand parses its arguments and calls one library function.

Nothing else happens here. A `LoratuneError` (bad config, bad data, missing model) is printed as one
line on stderr with a non-zero exit; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable

from loratune.errors import LoratuneError

Handler = Callable[[argparse.Namespace], int | None]


def _train(args: argparse.Namespace) -> None:
    from loratune.config import load_config

    cfg = load_config(args.config, args.overrides)  # config errors surface before torch is imported
    from loratune.train.run import train

    train(cfg)


def _config_docs(args: argparse.Namespace) -> None:
    from loratune.config import reference_markdown

    text = reference_markdown() + "\n"
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            f.write(text)
    else:
        sys.stdout.write(text)


def _add_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="Fine-tune a model from a YAML config.",
                       description="Fine-tune a model (QLoRA by default) from a YAML config. "
                                   "Any key can be overridden as section.key=value, e.g. train.lr=1e-4.")
    p.add_argument("config", help="YAML config file (see docs/config.md for every key)")
    p.add_argument("overrides", nargs="*", metavar="section.key=value", help="config overrides")
    p.set_defaults(handler=_train)


def _add_config_docs(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("config-docs", help="Print the reference of every config key (Markdown).")
    p.add_argument("--out", help="write to this file instead of stdout")
    p.set_defaults(handler=_config_docs)


def _data_preview(args: argparse.Namespace) -> None:
    from loratune.config import load_config
    from loratune.data.preview import preview

    preview(load_config(args.config, args.overrides), n=args.n, color=args.color)


def _add_data(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("data", help="Inspect training data as the model will see it.")
    actions = p.add_subparsers(dest="data_command", required=True, metavar="ACTION")
    pv = actions.add_parser("preview", help="Show rendered samples (supervised tokens marked) and data statistics.",
                            description="Prepare the data exactly as `loratune train` would and show N samples, "
                                        "supervised tokens in colour (or between ⟦ ⟧ when not a terminal), then "
                                        "statistics: samples per dataset, lengths, truncated and dropped counts, "
                                        "supervised fraction, packing efficiency.")
    pv.add_argument("config", help="YAML config file (its model and data sections are used)")
    pv.add_argument("overrides", nargs="*", metavar="section.key=value", help="config overrides")
    pv.add_argument("-n", type=int, default=3, help="samples to show (default: %(default)s)")
    pv.add_argument("--color", choices=["auto", "always", "never"], default="auto",
                    help="colour the output (auto: when writing to a terminal and NO_COLOR is unset)")
    pv.set_defaults(handler=_data_preview)


# Each entry adds one subcommand; a new command is one function here and one line in this list.
COMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [_add_train, _add_config_docs, _add_data]


def build_parser() -> argparse.ArgumentParser:
    from loratune import __version__

    parser = argparse.ArgumentParser(prog="loratune", description="QLoRA fine-tuning, chat, serving and export.")
    parser.add_argument("--version", action="version", version=f"loratune {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in COMMANDS:
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return int(args.handler(args) or 0)
    except LoratuneError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
