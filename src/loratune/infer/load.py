"""Load a base model with zero, one or several adapters for inference, and render prompts as training did.

An adapter folder is what `loratune train` writes: the PEFT adapter, the tokenizer with the chat template
used in training, `loratune.yaml` (the resolved config: which base, which precision) and
`loratune_run.json` (the template's name and end-of-turn text). Loading from it means inference renders
prompts with the same template and special tokens as training, and stops at the same end of turn.

Several adapters share one base (peft multi-adapter: `load_adapter`, then `set_adapter` per request);
the base alone is served too, with the adapters disabled. `Engine` is the handle chat and serve use: it
owns the model, a lock (one generation at a time: adapter switching is global state on the model), and
one `PromptFormat` per served name.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import threading
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from loratune.config import Config, ModelConfig, QuantizationConfig, load_config
from loratune.data.render import RenderError, encode_prompt
from loratune.data.templates import EOS, ChatTemplate, marker_tokens, resolve_template
from loratune.errors import ConfigError, ModelError
from loratune.infer.engine import Cancel, Delta, Finish, _never, generate_text
from loratune.infer.sampling import SamplingParams
from loratune.infer.tools import CallSyntax, call_syntax
from loratune.model.adapters import is_peft
from loratune.model.load import TokenizerInfo, load_base, load_tokenizer, resolve_model_path

log = logging.getLogger(__name__)

BASE_NAME = "base"


@dataclass(frozen=True)
class RunFolder:
    """A training output folder: where it is, the config it was trained with, its template's stop text."""

    path: Path
    cfg: Config
    template: str | None
    stop: str | None


def is_run_folder(path: str | Path) -> bool:
    return (Path(path) / "adapter_config.json").is_file()


def read_run_folder(path: str | Path) -> RunFolder:
    folder = Path(path)
    if not folder.exists():
        raise ModelError(f"no such folder: {folder}")
    if not folder.is_dir():
        raise ModelError(f"{folder} is a file, not an adapter folder")
    if not is_run_folder(folder):
        if (folder / "config.json").is_file():
            raise ModelError(f"{folder} holds a full model, not an adapter (no adapter_config.json): there is no "
                             "adapter to merge; transformers and `loratune chat/serve` load it as it is")
        raise ModelError(f"{folder} is not an adapter folder (no adapter_config.json)")
    if not (folder / "loratune.yaml").is_file():
        raise ModelError(f"{folder} has no loratune.yaml: it was not written by `loratune train`, so its base "
                         "model and chat template are unknown")
    cfg = load_config(folder / "loratune.yaml")
    run = {}
    if (folder / "loratune_run.json").is_file():
        run = json.loads((folder / "loratune_run.json").read_text(encoding="utf-8"))
    template = run.get("template") or {}
    return RunFolder(folder, cfg, template.get("name"), template.get("stop"))


@dataclass
class PromptFormat:
    """Turns messages or text into token ids and back, and knows what ends an answer.

    Conversations are rendered by the data module's `encode_prompt`, the function training's labels come
    from, so a served prompt is token for token the prefix training saw (one BOS, same template).
    """

    tokenizer: object
    info: TokenizerInfo
    template: ChatTemplate
    stop_ids: frozenset[int]
    stop_strings: tuple[str, ...] = ()

    def render(self, messages: Sequence[dict], tools: list[dict] | None = None) -> list[int]:
        """The prompt for the next assistant turn (raises `RenderError` if the template rejects it, or leaves out
        the tools or the tool calls it was given: the model would answer without knowing them)."""
        ids = encode_prompt(list(messages), self.template, self.tokenizer, self.info, tools=tools or None)
        wanted = {"tools": [t["function"]["name"] for t in tools or []],
                  "messages": [c["function"]["name"] for m in messages for c in m.get("tool_calls") or []]}
        if any(wanted.values()):
            text = self.tokenizer.decode(ids)
            for what, names in wanted.items():
                if any(n not in text for n in names):
                    raise ToolsNotRendered(what, f"{self.template.label} leaves out the "
                                           + ("tool schemas" if what == "tools" else "tool calls of the messages")
                                           + "; serve a model whose template renders tools (every built-in one does)")
        return ids

    @functools.cached_property
    def tool_syntax(self) -> CallSyntax | None:
        """How the template writes a tool call, to parse answers by (None: not a convention we recognise)."""
        return call_syntax(self.tokenizer, self.template)

    def encode(self, text: str, special: bool = True) -> list[int]:
        """Token ids of raw text; `special` adds BOS as the tokenizer does for plain text."""
        return list(self.tokenizer(text, add_special_tokens=special).input_ids)

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    @property
    def pad_id(self) -> int:
        return int(self.tokenizer.pad_token_id)


class ToolsNotRendered(RenderError):
    """The chat template drops tool schemas or tool calls; `what` is the request field they came in."""

    def __init__(self, what: str, message: str) -> None:
        super().__init__(message)
        self.what = what


def _eos_ids(model: torch.nn.Module) -> set[int]:
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    return set(eos if isinstance(eos, list) else [eos] if eos is not None else [])


def chat_template(tokenizer, stop_text: str | None, variables: dict | None = None) -> ChatTemplate:
    """The template to render with and its end-of-turn text.

    A run folder's tokenizer holds the template training used, and the run records its end of turn and the
    template's variables (`data.template_variables`). A plain model's template is resolved as training
    resolves `data.template=auto`: its own (a known template's end of turn, else the one inferred from what it
    writes after an assistant message), or, without one, the same fallback training takes (chatml when its
    markers are tokens of the vocabulary, else plain-text markers).
    """
    own = tokenizer.chat_template
    own = own.get("default") if isinstance(own, dict) else own
    if own and stop_text is not None:
        return ChatTemplate("saved", own, stop_text, dict(variables or {}))
    try:
        return resolve_template("auto", tokenizer, variables)
    except ConfigError as e:  # a template we cannot probe: stop at eos only, and say so
        log.warning("%s; answers stop at eos only", e)
        return ChatTemplate("tokenizer", own, EOS, dict(variables or {}))


def make_format(tokenizer, info: TokenizerInfo, model: torch.nn.Module, stop_text: str | None,
                template: ChatTemplate | None = None, variables: dict | None = None) -> PromptFormat:
    """Stop at eos, at the model's generation-config eos ids, and at the template's end of turn.

    `template` is the one to render with when the caller has it (training's own, for its sample answers);
    else it comes from the tokenizer (`chat_template`). The end-of-turn text is a stop token when it is one
    token (`<|eot_id|>`, `<end_of_turn>`), or when it ends with a marker token the tokenizer knows as one
    (decoding skips special tokens, so a stop string holding one would never match); else a stop string.
    """
    template = template or chat_template(tokenizer, stop_text, variables)
    ids = {int(tokenizer.eos_token_id)} | _eos_ids(model)
    strings: tuple[str, ...] = ()
    eot = template.stop_text(tokenizer.eos_token)
    pieces = tokenizer(eot, add_special_tokens=False).input_ids
    last = next((t for t in marker_tokens(tokenizer) if eot.endswith(t)), None)
    if len(pieces) == 1:
        ids.add(int(pieces[0]))
    elif last is not None:
        ids.add(int(tokenizer.convert_tokens_to_ids(last)))
    else:
        strings = (eot,)
    return PromptFormat(tokenizer, info, template, frozenset(ids), strings)


@dataclass
class Engine:
    """A loaded model and the names it serves: `base` and one per adapter."""

    model: torch.nn.Module
    formats: dict[str, PromptFormat]
    adapters: dict[str, str | None]  # public name -> peft adapter name (None: the base)
    context_length: int
    default: str
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def names(self) -> list[str]:
        return list(self.adapters)

    def format(self, name: str | None = None) -> PromptFormat:
        return self.formats[name or self.default]

    @contextlib.contextmanager
    def _use(self, name: str) -> Iterator[None]:
        inner = self.adapters[name]
        if not is_peft(self.model):  # a plain model (transformers models have a set_adapter of their own)
            yield
        elif inner is None:
            with self.model.disable_adapter():
                yield
        else:
            if self.model.active_adapter != inner:  # (set_adapter also resets requires_grad: only when needed)
                self.model.set_adapter(inner)
            yield

    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams, name: str | None = None,
                 cancel: Cancel = _never, ignore_eos: bool = False) -> Iterator[Delta | Finish]:
        """Stream the answers to already-tokenized prompts with model `name` (one generation at a time).

        `ignore_eos` generates past the stop tokens (benchmarks, tests); stop strings still apply.
        """
        name = name or self.default
        fmt = self.formats[name]
        stop_ids = frozenset() if ignore_eos else fmt.stop_ids
        with self._lock, self._use(name):
            yield from generate_text(self.model, prompts, params, decode=fmt.decode, stop_ids=stop_ids,
                                     pad_id=fmt.pad_id, cancel=cancel, max_total=self.context_length)

    def chat(self, messages: Sequence[dict], params: SamplingParams, name: str | None = None,
             cancel: Cancel = _never, tools: list[dict] | None = None) -> Iterator[Delta | Finish]:
        fmt = self.format(name)
        params = params.with_updates(stop=tuple(dict.fromkeys(params.stop + fmt.stop_strings)))
        return self.generate([fmt.render(messages, tools)], params, name, cancel)


def engine_for(model: torch.nn.Module, tokenizer, info: TokenizerInfo, stop_text: str | None,
               name: str = BASE_NAME, template: ChatTemplate | None = None) -> Engine:
    """Wrap a model already in memory (e.g. the trainer's, for sample answers) in an `Engine`; `template`, when
    given, is the one to render with (training's own).

    A peft model answers with its active adapter (the one being trained), not with the base alone.
    """
    context = int(getattr(model.config, "max_position_embeddings", 0) or 4096)
    inner = model.active_adapter if is_peft(model) else None
    return Engine(model, {name: make_format(tokenizer, info, model, stop_text, template)}, {name: inner}, context, name)


def _no_bar(factory, args: tuple, kwargs: dict) -> object:
    return factory(*args, **{**kwargs, "disable": True})


@contextlib.contextmanager
def quiet_loading() -> Iterator[None]:
    """transformers' own progress bars ("Loading weights", one per model and adapter) off while the block runs,
    through its public tqdm hook, restored after. The hub's download bars are a different tqdm and stay: a
    download of gigabytes needs its progress shown."""
    from transformers.utils import logging as hf_logging

    previous = hf_logging.set_tqdm_hook(_no_bar)
    try:
        yield
    finally:
        hf_logging.set_tqdm_hook(previous)


def quiet_library_noise() -> None:
    """For chat and serve, whose output a person reads: bitsandbytes warns on every 8-bit matmul with fp32
    inputs (once per token), and transformers' deprecation notices about its own internals say nothing to
    a user."""
    logging.getLogger("bitsandbytes.autograd._functions").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"transformers\.")


def parse_source(spec: str) -> tuple[str | None, str]:
    """`NAME=PATH` or `PATH` -> (name or None, path)."""
    name, sep, path = spec.partition("=")
    if sep and name and "/" not in name and ":" not in name:
        return name, path
    return None, spec


def load_engine(sources: Sequence[str], bits: int | None = None, base_name: str = BASE_NAME) -> Engine:
    """Load adapters (`[NAME=]FOLDER`) on their common base, or a plain model (a folder, hub id, demo://).

    `bits` overrides the precision the adapters were trained with (4, 8, 16 or 32).
    """
    if not sources:
        raise ModelError("name a model or an adapter folder")
    runs: list[tuple[str, RunFolder]] = []
    plain: list[str] = []
    for spec in sources:
        name, path = parse_source(spec)
        path = resolve_model_path(path)  # demo://FAMILY[-SIZE]: the built-in model's cached folder (built once)
        if not Path(path).exists() and (path.startswith((".", "/", "~")) or path.count("/") > 1):
            raise ModelError(f"no such folder: {path}")
        if is_run_folder(path):
            runs.append((name or Path(path).resolve().name, read_run_folder(path)))
        else:
            plain.append(path)
    if len(plain) > 1 or (plain and runs):
        raise ModelError("serve either one plain model, or adapter folders that share one base; got "
                         + ", ".join(sources))
    cfg = _inference_config(runs, plain, bits)
    names = [n for n, _ in runs]
    if len(set(names) | {base_name}) != len(names) + 1:
        raise ModelError(f"model names must be unique and differ from {base_name!r}: {names}")

    model = _load_base(cfg, plain)
    if torch.cuda.is_available() and cfg.quantization.bits in (16, 32):
        model = model.to("cuda")
    base_tok, base_info = load_tokenizer(cfg.model)
    formats = {base_name: make_format(base_tok, base_info, model, _run_stop(plain[0]) if plain else None)}
    adapters: dict[str, str | None] = {base_name: None}
    if runs:
        from peft import PeftModel

        for i, (name, run) in enumerate(runs):
            inner = f"adapter{i}"  # peft names become module keys: keep user names out of them
            if i == 0:
                model = PeftModel.from_pretrained(model, str(run.path), adapter_name=inner)
            else:
                model.load_adapter(str(run.path), adapter_name=inner)
            tok, info = load_tokenizer(ModelConfig(path=str(run.path)))
            _check_vocab(tok, model, run.path)
            formats[name] = make_format(tok, info, model, run.stop, variables=run.cfg.data.template_variables)
            adapters[name] = inner
    model.eval()
    context = int(getattr(model.config, "max_position_embeddings", 0) or 4096)
    default = names[0] if names else base_name
    return Engine(model, formats, adapters, context, default)


def _load_base(cfg: Config, plain: list[str]) -> torch.nn.Module:
    """`load_base`, with a plainer message when a name that is no local folder is not a hub model either."""
    try:
        return load_base(cfg)
    except ModelError as e:
        if plain and not Path(plain[0]).exists() and "://" not in plain[0]:
            raise ModelError(f"{plain[0]!r} is neither a local folder nor a model that could be loaded from the "
                             f"hub ({e})") from None
        raise


def _inference_config(runs: list[tuple[str, RunFolder]], plain: list[str], bits: int | None) -> Config:
    if runs:
        cfg = runs[0][1].cfg
        base = resolve_model_path(cfg.model.path)
        for name, run in runs[1:]:
            if resolve_model_path(run.cfg.model.path) != base:
                raise ModelError(f"adapter {name!r} was trained on {run.cfg.model.path!r}, but "
                                 f"{runs[0][0]!r} on {cfg.model.path!r}: adapters served together need one base")
        cfg = Config(model=cfg.model, quantization=cfg.quantization)
    else:
        cfg = Config(model=ModelConfig(path=plain[0]), quantization=_saved_quantization(plain[0]))
    if bits is not None:
        cfg.quantization = QuantizationConfig(**{**cfg.quantization.__dict__, "bits": bits})
    return cfg


def _saved_quantization(path: str) -> QuantizationConfig:
    """16-bit, unless the folder holds a bitsandbytes-quantized checkpoint (e.g. `export --quantize-4bit`)."""
    config = Path(path) / "config.json"
    q = json.loads(config.read_text(encoding="utf-8")).get("quantization_config") if config.is_file() else None
    if not q or q.get("quant_method") != "bitsandbytes":
        return QuantizationConfig(bits=16)
    if q.get("load_in_8bit"):
        return QuantizationConfig(bits=8)
    return QuantizationConfig(bits=4, quant_type=q.get("bnb_4bit_quant_type", "nf4"),
                              double_quant=bool(q.get("bnb_4bit_use_double_quant", False)))


def _run_stop(path: str) -> str | None:
    """The end-of-turn text recorded by a full fine-tuning run (a model folder with loratune_run.json)."""
    run = Path(path) / "loratune_run.json"
    if not run.is_file():
        return None
    return (json.loads(run.read_text(encoding="utf-8")).get("template") or {}).get("stop")


def _check_vocab(tokenizer, model: torch.nn.Module, folder: Path) -> None:
    rows = model.get_input_embeddings().weight.shape[0]
    if len(tokenizer) > rows:
        raise ModelError(f"the tokenizer in {folder} has {len(tokenizer)} tokens but the model's embedding has "
                         f"{rows} rows")
