"""Load a base model with zero, one or several adapters for inference, and render prompts as training did.

An adapter folder is what `loratune train` writes: the PEFT adapter, the tokenizer with the chat template
used in training, `loratune.yaml` (the resolved config: which base, which precision) and
`loratune_run.json` (the template's name and end-of-turn text). Loading from it means inference renders
prompts with the same template and special tokens as training, and stops at the same end of turn.

Which model code answers is decided as for training (`loratune.model.resolve.choose_implementation`):
loratune's decoder where it covers the model and its adapters, else transformers + peft; one line says
which and why. Several adapters share one base: on the decoder, each adapter's tensors are kept aside (an LRU
on the device, `loratune.infer.adapters.AdapterBank`) and put on its layers when that name answers, or applied
per row when one batch mixes adapters (`loratune.infer.batcher`); adapters may be added and removed while
serving (`Engine.add_adapter`, `remove_adapter`); on the transformers
model, peft's multi-adapter API (`load_adapter`, then `set_adapter` per request). The base alone is served
too, with no adapter on. `Engine` is the handle chat, serve, eval and training's sample answers use: it
owns the model, a lock (one generation at a time: the adapter on is global state of the model; `use`),
and one `PromptFormat` per served name.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import logging
import threading
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import torch

from loratune.config import Config, ModelConfig, QuantizationConfig, load_config
from loratune.data.render import RenderError, encode_prompt
from loratune.data.templates import EOS, ChatTemplate, marker_tokens, resolve_template
from loratune.decoder.model import Decoder
from loratune.errors import ConfigError, ModelError
from loratune.infer.adapters import AdapterBank
from loratune.infer.engine import Cancel, Delta, Finish, _never, generate_text
from loratune.infer.sampling import SamplingParams
from loratune.infer.tools import CallSyntax, call_syntax
from loratune.model.adapters import is_peft
from loratune.model.load import TokenizerInfo, load_base, load_tokenizer, resolve_model_path
from loratune.model.new_tokens import resize_for_tokens

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


class UnknownModel(ModelError):
    """No model of that name is served."""


class NameTaken(ModelError):
    """A model of that name is served already."""


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
    """A loaded model and the names it serves: `base` and one per adapter.

    `model` is loratune's `Decoder` (with `bank`, its adapters by key) or the transformers model (peft-wrapped
    when it has adapters); `adapters` maps each public name to its adapter key (None: the bare base).
    `why` says which model code answers and why, in one line.
    """

    model: torch.nn.Module
    formats: dict[str, PromptFormat]
    adapters: dict[str, str | None]  # public name -> adapter key (peft adapter name or bank key; None: the base)
    context_length: int
    default: str
    bank: AdapterBank | None = None
    why: str = ""
    base_path: str | None = None  # the base model (resolved path) adapters loaded at run time must be trained on
    generation_config: object = None  # the base's (its end-of-sequence ids), for the formats of adapters added later
    _lock: threading.RLock = field(default_factory=threading.RLock)
    _held: list[str] = field(default_factory=list)  # names `use` is holding, innermost last (under the lock)
    _added: int = 0  # adapters added so far (their bank keys are numbered)

    @property
    def names(self) -> list[str]:
        return list(self.adapters)

    @property
    def decoder(self) -> bool:
        """Whether loratune's decoder answers (else the transformers model)."""
        return isinstance(self.model, Decoder)

    @property
    def vocab_size(self) -> int:
        """Rows of the input embedding: token ids must be below it."""
        if isinstance(self.model, Decoder):
            return int(self.model.embed.weight.shape[0])
        return int(self.model.get_input_embeddings().weight.shape[0])

    @property
    def base_name(self) -> str:
        return next(n for n, key in self.adapters.items() if key is None)

    def format(self, name: str | None = None) -> PromptFormat:
        name = name or self.default
        if name not in self.formats:
            raise UnknownModel(f"no model named {name!r}; loaded: {', '.join(self.names)}")
        return self.formats[name]

    def key_of(self, name: str | None) -> str | None:
        """The adapter key model `name` answers with (None: the bare base)."""
        name = name or self.default
        if name not in self.adapters:
            raise UnknownModel(f"no model named {name!r}; loaded: {', '.join(self.names)}")
        return self.adapters[name]

    # ------------------------------------------------------------------------------------------ run-time adapters

    def add_adapter(self, name: str, folder: str | Path) -> None:
        """Serve the adapter run folder `folder` as `name` from now on (read and checked first: its base, its
        modules and shapes against the decoder; `ModelError` naming what does not fit)."""
        from loratune.decoder.peft_io import read_adapter

        if self.bank is None:
            raise ModelError(f"adapters are loaded at run time on loratune's decoder; this server answers with "
                             f"transformers ({self.why})")
        if name in self.adapters:
            raise NameTaken(f"a model named {name!r} is already served")
        run = read_run_folder(folder)
        base = resolve_model_path(run.cfg.model.path)
        if self.base_path is not None and base != self.base_path:
            raise ModelError(f"{folder} was trained on {run.cfg.model.path!r}; this server's base is "
                             f"{self.base_path!r}")
        fmt = _run_format(run, self.vocab_size, SimpleNamespace(generation_config=self.generation_config))
        adapter = read_adapter(self.model, run.path)
        with self._lock:
            if name in self.adapters:
                raise NameTaken(f"a model named {name!r} is already served")
            self._added += 1
            key = f"added{self._added}"
            self.bank.add(key, run.path, adapter)
            self.formats[name], self.adapters[name] = fmt, key

    def remove_adapter(self, name: str) -> None:
        """Stop serving adapter `name` (requests running with it finish first; its device copy goes after them)."""
        key = self.key_of(name)
        if key is None:
            raise ModelError(f"{name!r} is the base model; it cannot be unloaded")
        with self._lock:
            del self.adapters[name], self.formats[name]
            if self.default == name:
                self.default = self.base_name
            if self.bank is not None:
                self.bank.remove(key)

    def hold(self, name: str | None) -> str | None:
        """A request starts answering as `name`: its adapter resident until `release(key)`; returns the key."""
        with self._lock:
            key = self.key_of(name)
            if self.bank is not None:
                self.bank.pin(key)
            return key

    def release(self, key: str | None) -> None:
        with self._lock:
            if self.bank is not None:
                self.bank.unpin(key)

    def has_room(self, name: str | None) -> bool:
        """Whether a request for `name` can start without dropping an adapter a running request holds."""
        if self.bank is None or name not in self.adapters:
            return True  # (an unknown name is refused when it is held)
        return self.bank.has_room(self.adapters[name])

    @contextlib.contextmanager
    def serving(self, keys: set[str | None]) -> Iterator[torch.nn.Module]:
        """The decoder for a pass whose rows use the adapters `keys` (held ones): one key, that adapter on its
        layers (the fused LoRA path); several, none on (the caller lays out rows with `bank.plan.rows`)."""
        with self._lock:
            if self.bank is not None:
                self.bank.activate(next(iter(keys)) if len(keys) == 1 else None)
            elif len(keys) > 1:  # (`engine_for`: one model as it is, no adapters kept aside)
                raise ModelError(f"this engine serves one model as it is; rows asked for {sorted(map(str, keys))}")
            yield self.model

    @contextlib.contextmanager
    def use(self, name: str | None = None) -> Iterator[torch.nn.Module]:
        """The model answering as `name` (its adapter on, or none for the base), for the block: thread-safe, the
        engine's lock is held throughout (other threads wait). Re-entrant within a thread for the same name; a
        different name inside is an error (the outer block would silently answer as the inner name after it)."""
        name = name or self.default
        if name not in self.adapters:
            raise UnknownModel(f"no model named {name!r}; loaded: {', '.join(self.names)}")
        with self._lock:
            if self._held and self._held[-1] != name:
                raise ModelError(f"engine.use({name!r}) inside engine.use({self._held[-1]!r}): one model at a time")
            self._held.append(name)
            try:
                with self._activate(name):
                    yield self.model
            finally:
                self._held.pop()

    @contextlib.contextmanager
    def _activate(self, name: str) -> Iterator[None]:
        key = self.adapters[name]
        if self.bank is not None:
            self.bank.activate(key)
            yield
        elif not is_peft(self.model):  # a plain model, or a decoder served with the adapter it has
            yield
        elif key is None:
            with self.model.disable_adapter():
                yield
        else:
            if self.model.active_adapter != key:  # (set_adapter also resets requires_grad: only when needed)
                self.model.set_adapter(key)
            yield

    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams, name: str | None = None,
                 cancel: Cancel = _never, ignore_eos: bool = False) -> Iterator[Delta | Finish]:
        """Stream the answers to already-tokenized prompts with model `name` (one generation at a time).

        `ignore_eos` generates past the stop tokens (benchmarks, tests); stop strings still apply.
        """
        name = name or self.default
        fmt = self.format(name)
        stop_ids = frozenset() if ignore_eos else fmt.stop_ids
        with self.use(name) as model:
            yield from generate_text(model, prompts, params, decode=fmt.decode, stop_ids=stop_ids,
                                     pad_id=fmt.pad_id, cancel=cancel, max_total=self.context_length)

    def chat(self, messages: Sequence[dict], params: SamplingParams, name: str | None = None,
             cancel: Cancel = _never, tools: list[dict] | None = None) -> Iterator[Delta | Finish]:
        fmt = self.format(name)
        params = params.with_updates(stop=tuple(dict.fromkeys(params.stop + fmt.stop_strings)))
        return self.generate([fmt.render(messages, tools)], params, name, cancel)


def engine_for(model: torch.nn.Module, tokenizer, info: TokenizerInfo, stop_text: str | None,
               name: str = BASE_NAME, template: ChatTemplate | None = None, *, context_length: int | None = None,
               generation_config=None) -> Engine:
    """Wrap a model already in memory (e.g. the trainer's, for sample answers) in an `Engine`; `template`, when
    given, is the one to render with (training's own).

    The model answers with the adapter it has (a peft model: its active adapter, the one being trained; a
    decoder: the adapters on its layers), not with the base alone. For a decoder, which keeps no transformers
    config, `context_length` and `generation_config` (its end-of-sequence ids) come from the caller.
    """
    facts = SimpleNamespace(generation_config=generation_config if generation_config is not None
                            else getattr(model, "generation_config", None))
    context = context_length or _context(model)
    inner = model.active_adapter if is_peft(model) else None
    fmt = make_format(tokenizer, info, facts, stop_text, template)
    return Engine(model, {name: fmt}, {name: inner}, context, name,
                  why="model: loratune's decoder" if isinstance(model, Decoder) else "model: transformers")


def _context(model: torch.nn.Module) -> int:
    return int(getattr(getattr(model, "config", None), "max_position_embeddings", 0) or 4096)


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


# What `load_engine` answers with when the caller does not say: "transformers" until eval's tests and scoring
# take an engine on the decoder (eval builds its own decoder view over the transformers base for scoring);
# chat, serve and training's sample answers pass None (training's rule: the decoder where it covers the model).
DEFAULT_IMPLEMENTATION: str | None = "transformers"


def load_engine(sources: Sequence[str], bits: int | None = None, base_name: str = BASE_NAME,
                implementation: str | None = DEFAULT_IMPLEMENTATION, max_adapters: int | None = None) -> Engine:
    """Load adapters (`[NAME=]FOLDER`) on their common base, or a plain model (a folder, hub id, demo://).

    `bits` overrides the precision the adapters were trained with (4, 8, 16 or 32). `implementation`
    (auto | loratune | transformers; None: the run's `model.implementation`, or the environment's
    LORATUNE_IMPLEMENTATION, as in training) overrides the run's `model.implementation`: which model code answers is
    decided as for training (`loratune.model.resolve.choose_implementation`: loratune's decoder where it
    covers the model and adapters, else transformers + peft), and said in one line (`Engine.why`, logged).
    `max_adapters`: on the decoder, at most that many adapters on the device at once (an LRU; None: no limit).
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
    cfg = _inference_config(runs, plain, bits, implementation)
    names = [n for n, _ in runs]
    if len(set(names) | {base_name}) != len(names) + 1:
        raise ModelError(f"model names must be unique and differ from {base_name!r}: {names}")

    model = _load_base(cfg, plain)
    if runs:  # runs that added tokens: the base grown to their tokenizer first (loratune.model.new_tokens)
        resize_for_tokens(model, max(len(load_tokenizer(ModelConfig(path=str(r.path)))[0]) for _, r in runs))
    if torch.cuda.is_available() and cfg.quantization.bits in (16, 32):
        model = model.to("cuda")
    chosen, why = _choose_implementation(cfg, runs, model.config)
    log.info("%s", why)
    facts = SimpleNamespace(generation_config=getattr(model, "generation_config", None))
    context = _context(model)
    base_tok, base_info = load_tokenizer(cfg.model)
    formats = {base_name: make_format(base_tok, base_info, facts, _run_stop(plain[0]) if plain else None)}
    adapters: dict[str, str | None] = {base_name: None}
    default = names[0] if names else base_name
    if chosen == "loratune":
        from loratune.decoder.load import decoder_from_hf

        decoder = decoder_from_hf(model).eval()
        del model  # the transformers module tree goes; its tensors live on in the decoder
        bank = AdapterBank(decoder, max_adapters)
        for i, (name, run) in enumerate(runs):
            key = f"adapter{i}"
            bank.add(key, run.path)
            formats[name] = _run_format(run, decoder.embed.weight.shape[0], facts)
            adapters[name] = key
        return Engine(decoder, formats, adapters, context, default, bank, why,
                      base_path=resolve_model_path(cfg.model.path), generation_config=facts.generation_config)
    if runs:
        from peft import PeftModel

        for i, (name, run) in enumerate(runs):
            inner = f"adapter{i}"  # peft names become module keys: keep user names out of them
            if i == 0:
                model = PeftModel.from_pretrained(model, str(run.path), adapter_name=inner)
            else:
                model.load_adapter(str(run.path), adapter_name=inner)
            formats[name] = _run_format(run, model.get_input_embeddings().weight.shape[0], facts)
            adapters[name] = inner
    model.eval()
    return Engine(model, formats, adapters, context, default, why=why)


def _run_format(run: RunFolder, vocab_rows: int, facts) -> PromptFormat:
    """The prompt format of a run folder: its tokenizer (checked against the model's vocabulary) and template."""
    tok, info = load_tokenizer(ModelConfig(path=str(run.path)))
    if len(tok) > vocab_rows:
        raise ModelError(f"the tokenizer in {run.path} has {len(tok)} tokens but the model's embedding has "
                         f"{vocab_rows} rows")
    return make_format(tok, info, facts, run.stop, variables=run.cfg.data.template_variables)


def _choose_implementation(cfg: Config, runs: list[tuple[str, RunFolder]], model_config) -> tuple[str, str]:
    """(loratune | transformers, the one line saying which and why): training's rule, for the base and every
    adapter served on it (each run's adapter settings; a plain model's are the defaults, LoRA)."""
    from loratune.model.resolve import choose_implementation

    settings = [run.cfg.adapter for _, run in runs] or [Config().adapter]
    decisions = [choose_implementation(Config(model=cfg.model, quantization=cfg.quantization, adapter=a),
                                       model_config) for a in settings]
    return next((d for d in decisions if d[0] != "loratune"), decisions[0])


def _load_base(cfg: Config, plain: list[str]) -> torch.nn.Module:
    """`load_base`, with a plainer message when a name that is no local folder is not a hub model either."""
    try:
        return load_base(cfg)
    except ModelError as e:
        if plain and not Path(plain[0]).exists() and "://" not in plain[0]:
            raise ModelError(f"{plain[0]!r} is neither a local folder nor a model that could be loaded from the "
                             f"hub ({e})") from None
        raise


def _inference_config(runs: list[tuple[str, RunFolder]], plain: list[str], bits: int | None,
                      implementation: str | None = None) -> Config:
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
    if implementation is not None:
        cfg.model = dataclasses.replace(cfg.model, implementation=implementation)
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
