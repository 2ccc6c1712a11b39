"""The `loratune` command: each subcommand parses its arguments and calls one library function.

Nothing else happens here. A `LoratuneError` (bad config, bad data, missing model) is printed as one
line on stderr with a non-zero exit; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys
import warnings
from collections.abc import Callable, Iterator

from loratune.errors import LoratuneError
from loratune.eval.cli import add_eval

Handler = Callable[[argparse.Namespace], int | None]


def _train(args: argparse.Namespace) -> int:
    from loratune.config import load_config

    cfg = load_config(args.config, args.overrides)  # config errors surface before torch is imported
    from loratune.train.run import train

    return train(cfg).exit_code  # 130/143 when SIGINT/SIGTERM stopped it (after saving a checkpoint)


def _plan(args: argparse.Namespace) -> None:
    from loratune.config import load_config

    cfg = load_config(args.config, args.overrides)
    from loratune.model.memory import GiB, WouldNotFit, default_device, describe, plan_run, render
    from loratune.train.run import planned

    cfg = planned(cfg)  # a preference method's samples are pairs: planned as training plans them

    device = default_device() if args.device == "auto" else args.device
    budget = None if args.budget_gib is None else int(args.budget_gib * GiB)
    gpus = args.gpus or (cfg.train.devices if isinstance(cfg.train.devices, int) else 1)
    try:
        rp = plan_run(cfg, device=device, budget=budget)
        print(describe(rp, cfg))
    except WouldNotFit as e:
        print(render(e.plan))
        if gpus == 1:
            raise
        from loratune.model.parallel_plan import print_per_gpu

        print_per_gpu(cfg, e.plan, gpus, args.strategy, budget, error=e)
        return
    if gpus > 1:
        from loratune.model.parallel_plan import print_per_gpu

        print_per_gpu(cfg, rp.plan, gpus, args.strategy, rp.budget)


def _config_args(p: argparse.ArgumentParser, help: str = "YAML config file (see docs/config.md for every key)") -> None:
    """The CONFIG and section.key=value arguments every config-driven subcommand takes.

    Overrides may come anywhere after CONFIG, before or after the options (`parse_args` gathers them).
    """
    p.add_argument("config", help=help)
    p.add_argument("overrides", nargs="*", metavar="section.key=value",
                   help="config overrides, anywhere on the line after CONFIG")
    p.set_defaults(command_parser=p)


def _add_plan(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("plan", help="Estimate the peak memory of a training run, without loading the model.",
                       description="Print the estimated peak memory of `loratune train CONFIG`, component by "
                                   "component, from the model's config.json alone (no weights are read), resolve "
                                   "train.batch_size auto, and fail (exit 2) if the run would not fit the free "
                                   "memory of the device (or --budget-gib).")
    _config_args(p)
    p.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto",
                   help="plan for this device (default: a GPU when there is one)")
    p.add_argument("--budget-gib", type=float, help="plan against this much free memory instead of what the "
                                                    "device has now (e.g. 80 for an H100 you are not on)")
    p.add_argument("--gpus", type=int, help="plan per GPU for this many GPUs training together (default: "
                                            "train.devices when a number, else 1); see docs/multi-gpu.md")
    p.add_argument("--strategy", choices=["ddp", "fsdp", "both"], default="both",
                   help="with --gpus N > 1: the per-GPU plan of this strategy (default: both)")
    p.set_defaults(handler=_plan)


def _config_docs(args: argparse.Namespace) -> None:
    if args.eval:
        from loratune.eval.config import reference_markdown
    else:
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
    _config_args(p)
    p.set_defaults(handler=_train)


def _add_config_docs(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("config-docs", help="Print the reference of every config key (Markdown).")
    p.add_argument("--out", help="write to this file instead of stdout")
    p.add_argument("--eval", action="store_true", help="the keys of `loratune eval`'s file (docs/eval-config.md) "
                                                       "instead of training's (docs/config.md)")
    p.set_defaults(handler=_config_docs)


def _sampling_args(p: argparse.ArgumentParser, temperature: float) -> None:
    g = p.add_argument_group("sampling")
    g.add_argument("--temperature", type=float, default=temperature, help="0 is greedy (default: %(default)s)")
    g.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default: %(default)s)")
    g.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens; 0 keeps all")
    g.add_argument("--repetition-penalty", type=float, default=1.0, help="> 1 discourages repeats")
    g.add_argument("--max-tokens", type=int, default=512, help="new tokens per answer (default: %(default)s)")
    g.add_argument("--seed", type=int, default=None, help="seed for reproducible sampling")
    g.add_argument("--stop", action="append", default=[], metavar="TEXT",
                   help="end the answer at this text (repeatable); the template's end of turn always ends it")


def _chat(args: argparse.Namespace) -> int:
    from loratune.infer.chat import run_chat
    from loratune.infer.sampling import SamplingParams

    params = SamplingParams(max_new_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                            top_k=args.top_k, repetition_penalty=args.repetition_penalty, seed=args.seed,
                            stop=tuple(args.stop))
    return run_chat([args.model], bits=args.bits, system=args.system, prompt=args.prompt, params=params,
                    tools_file=args.tools)


def _add_chat(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("chat", help="Chat with a model or a trained adapter in the terminal.",
                       description="Chat in the terminal with a trained adapter folder (its base, precision and "
                                   "chat template come from the folder) or a plain model. Interactive on a terminal; "
                                   "with --prompt or piped stdin it answers once and exits.")
    p.add_argument("model", metavar="MODEL_OR_ADAPTER", help="adapter folder from `loratune train`, model folder, "
                                                              "hub id or demo://llama")
    p.add_argument("--prompt", help="answer this prompt and exit (stdin is read when it is not a terminal)")
    p.add_argument("--system", help="system prompt")
    p.add_argument("--tools", metavar="FILE.json", help="a JSON list of OpenAI tool schemas the model may call; "
                                                        "calls are printed, `/tool RESULT` answers them")
    p.add_argument("--bits", type=int, choices=[4, 8, 16, 32], help="override the base precision the adapter "
                                                                     "was trained with")
    _sampling_args(p, temperature=0.7)
    p.set_defaults(handler=_chat)


def _serve(args: argparse.Namespace) -> None:
    from loratune.infer.server import serve

    limits = {"default_max_tokens": args.default_max_tokens, "max_n": args.max_n,
              "max_body_bytes": args.max_body_bytes}
    if args.max_tokens:
        limits["max_tokens"] = args.max_tokens
    serve(args.models, host=args.host, port=args.port, api_key=args.api_key, bits=args.bits,
          max_pending=args.max_pending, limits=limits, batch_slots=args.batch_slots,
          slot_tokens=args.slot_tokens or None, rewards=args.reward, max_adapters=args.max_adapters or None,
          adapter_dirs=args.adapter_dir)


def _add_serve(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="Serve models and adapters over an OpenAI-compatible HTTP API.",
                       description="Serve a base with one or more adapters (chosen per request by the `model` "
                                   "field; the base itself is `base`) at /v1/chat/completions, /v1/completions "
                                   "and /v1/models.")
    p.add_argument("models", nargs="+", metavar="[NAME=]ADAPTER_OR_MODEL",
                   help="adapter folders sharing one base (named after their folder unless NAME= is given), "
                        "or one plain model")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: %(default)s, this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (default: %(default)s)")
    p.add_argument("--api-key", help="require `Authorization: Bearer KEY` on every route "
                                     "(default: the LORATUNE_API_KEY environment variable)")
    p.add_argument("--bits", type=int, choices=[4, 8, 16, 32], help="override the base precision")
    p.add_argument("--max-pending", type=int, default=8, help="requests running or queued; more get 429")
    p.add_argument("--max-tokens", type=int, default=0, help="largest max_tokens a request may ask (0: the context)")
    p.add_argument("--default-max-tokens", type=int, default=512, help="max_tokens when a request names none")
    p.add_argument("--max-n", type=int, default=8, help="largest n a request may ask")
    p.add_argument("--max-body-bytes", type=int, default=1 << 20, help="largest request body")
    p.add_argument("--batch-slots", type=int, default=1,
                   help="answers decoded together by continuous batching on loratune's decoder (1: one request "
                        "at a time); each slot holds a KV cache of --slot-tokens")
    p.add_argument("--slot-tokens", type=int, default=0,
                   help="tokens (prompt + answer) a batch slot holds (0: the model's context length)")
    p.add_argument("--reward", action="append", default=[], metavar="[NAME=]RUN",
                   help="a reward model (a run of train.method rm) scoring conversations at POST /v1/rewards; "
                        "loaded as training built it, beside the served models (repeatable)")
    p.add_argument("--max-adapters", type=int, default=0,
                   help="adapters on the device at once (an LRU: the least recently used one not answering a "
                        "request is dropped, and read again from its folder when asked for; 0: no limit)")
    p.add_argument("--adapter-dir", action="append", default=[], metavar="DIR",
                   help="a directory adapter run folders may be loaded from while serving (POST /v1/adapters; "
                        "repeatable; none: loading at run time is off)")
    p.set_defaults(handler=_serve)


def _export(args: argparse.Namespace) -> None:
    from loratune.export.cli_export import run_export

    run_export(args)


def _add_export(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="Merge an adapter into its base and save a plain transformers model.",
                       description="Dequantize the base (if 4- or 8-bit), merge the adapter in 16-bit, save "
                                   "safetensors shards with the tokenizer, chat template and generation config, "
                                   "and verify the merged model against the adapter on the dequantized base.")
    p.add_argument("adapter", help="adapter folder from `loratune train`")
    p.add_argument("--out", help="output folder (required unless --adapter-only)")
    p.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default="bf16", help="merged weights dtype")
    p.add_argument("--quantize-4bit", metavar="DIR", help="also save the merged model re-quantized to NF4 here")
    p.add_argument("--shard-size", default="5GB", help="largest safetensors shard (default: %(default)s)")
    p.add_argument("--min-agreement", type=float, default=0.9,
                   help="fail if top-1 agreement of merged vs adapter model is below this (default: %(default)s)")
    p.add_argument("--overwrite", action="store_true", help="allow writing into a non-empty --out")
    from loratune.export.cli_export import add_arguments

    add_arguments(p)  # --gguf, --push-to-hub and their options
    p.set_defaults(handler=_export)


def _reward(args: argparse.Namespace) -> None:
    from loratune.pref.reward import pairwise_accuracy

    r = pairwise_accuracy(args.model, args.pairs, batch_size=args.batch_size)
    print(f"pairwise accuracy {r['accuracy']:.4f} on {r['pairs']} pairs (chosen scored above rejected); mean margin "
          f"{r['margin']:.4f}; loss {r['loss']:.4f}")


def _add_reward(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("reward", help="Score preference pairs with a reward model (train.method rm).",
                       description="Pairwise accuracy, mean reward margin and loss of a reward model written by "
                                   "`loratune train` with train.method rm, on preference pairs in any shape training "
                                   "reads (prompt/chosen/rejected, message lists, Anthropic HH).")
    p.add_argument("model", help="the reward model's output folder (adapter + reward_head.safetensors)")
    p.add_argument("pairs", help="a file or folder of preference pairs")
    p.add_argument("--batch-size", type=int, default=8, help="pairs per forward pass (default: %(default)s)")
    p.set_defaults(handler=_reward)


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
    _config_args(pv, "YAML config file (its model and data sections are used)")
    pv.add_argument("-n", type=int, default=3, help="samples to show (default: %(default)s)")
    pv.add_argument("--color", choices=["auto", "always", "never"], default="auto",
                    help="colour the output (auto: when writing to a terminal and NO_COLOR is unset)")
    pv.set_defaults(handler=_data_preview)


def _ui(args: argparse.Namespace) -> None:
    from loratune.ui.server import serve_ui

    serve_ui(host=args.host, port=args.port, workspace=args.workspace, token=args.token, lang=args.lang)


def _add_ui(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("ui", help="Start the web UI (train, data, chat, evaluate, export, runs) in a browser.",
                       description="Serve a local web app over one workspace folder: a training form generated from "
                                   "the config schema, data preview, chat side by side, eval, export and a run browser "
                                   "(needs the `ui` extra: pip install 'loratune[ui]'). Files are read and written only "
                                   "inside the workspace. See docs/ui.md.")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: %(default)s, this machine only); "
                                                       "any other address needs --token")
    p.add_argument("--port", type=int, default=7860, help="port (default: %(default)s)")
    p.add_argument("--workspace", default=".", help="the folder the UI may read and write (default: the current one)")
    p.add_argument("--token", help="password the page asks for (default: the LORATUNE_UI_TOKEN environment variable)")
    p.add_argument("--lang", choices=["en", "zh", "ru"], default="en", help="language the page opens in")
    p.set_defaults(handler=_ui)


# Each entry adds one subcommand; a new command is one function here and one line in this list.
COMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [
    _add_train, _add_plan, _add_config_docs, _add_chat, _add_serve, _add_export, _add_data, add_eval, _add_ui,
    _add_reward]


def build_parser() -> argparse.ArgumentParser:
    from loratune import __version__

    parser = argparse.ArgumentParser(prog="loratune", description="QLoRA fine-tuning, chat, serving and export.")
    parser.add_argument("--version", action="version", version=f"loratune {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in COMMANDS:
        add(sub)
    return parser


class UserFormatter(logging.Formatter):
    """What a person reads: information as plain lines; warnings and errors say that they are."""

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        return f"{record.levelname.lower()}: {text}" if record.levelno >= logging.WARNING else text


def _shown_once(record: logging.LogRecord) -> bool:
    """loratune's records, and other libraries' warnings unless their logger prints them itself (no doubles)."""
    if record.name == "loratune" or record.name.startswith("loratune."):
        return True
    if record.levelno < logging.WARNING:
        return False
    logger: logging.Logger | None = logging.getLogger(record.name)
    while logger is not None and logger is not logging.root:
        if logger.handlers:
            return False
        logger = logger.parent if logger.propagate else None
    return True


def _configure_logging(verbose: bool) -> None:
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s") if verbose else UserFormatter())
    if not verbose:
        handler.addFilter(_shown_once)
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, handlers=[handler])


# Library output that says nothing a loratune user can act on. Each entry is scoped to its source:
# - bitsandbytes' CPU backend warns at import that its optional AVX512 inference kernel (from the `kernels`
#   package) is missing; loratune never calls that kernel (model/quant.py keeps the standard 4-bit layout).
# - FutureWarnings raised inside transformers and peft are about their own APIs and internals (one library
#   reading another's deprecated alias); they are for loratune's developers, who see them in tests.
QUIET_LOGGERS = ("bitsandbytes.backends.cpu.ops",)
QUIET_WARNING_MODULES = r"(transformers|peft)(\.|$)"


def _silent_bar(factory: Callable, args: tuple, kwargs: dict) -> object:
    return factory(*args, **{**kwargs, "disable": True})


@contextlib.contextmanager
def quiet_libraries(verbose: bool) -> Iterator[None]:
    """For one command: hide the library noise above and transformers' own progress bars ("Loading weights",
    "Writing model shards"), unless `-v`. Everything is put back on exit.

    The warnings filters are appended, so they sit below any filter the user (-W, PYTHONWARNINGS) or a caller
    set: those still decide first. Logging levels change only for the loggers named in QUIET_LOGGERS; every
    other warning a library logs (an unused checkpoint weight, a dequantization dtype) is still shown. The
    hub's download bars are left alone: a download of gigabytes needs its progress shown.
    """
    if verbose:
        yield
        return
    from transformers.utils import logging as hf_logging

    levels = {name: logging.getLogger(name).level for name in QUIET_LOGGERS}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning, module=QUIET_WARNING_MODULES, append=True)
        for name in QUIET_LOGGERS:
            logging.getLogger(name).setLevel(logging.ERROR)
        previous = hf_logging.set_tqdm_hook(_silent_bar)
        try:
            yield
        finally:
            hf_logging.set_tqdm_hook(previous)
            for name, level in levels.items():
                logging.getLogger(name).setLevel(level)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse the command line; section.key=value overrides may sit before, between or after the options.

    argparse gives a `nargs="*"` positional only the words before the first option, and its
    `parse_intermixed_args` refuses parsers with subcommands; so the words argparse leaves over are
    taken as more overrides (in their order on the line) by the subcommands that have them, and
    anything else left over (an unknown option) is still an error.
    """
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    own = getattr(args, "command_parser", None)
    unknown = [a for a in rest if a.startswith("-") or own is None]
    if unknown:
        (own or parser).error(f"unrecognized arguments: {' '.join(unknown)}")
    if rest:
        args.overrides = [*args.overrides, *rest]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    _configure_logging(args.verbose)
    try:
        with quiet_libraries(args.verbose):
            return int(args.handler(args) or 0)
    except LoratuneError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
