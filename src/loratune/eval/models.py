"""The models of an eval: which are loaded together, how each is named, and what identifies its weights.

Adapter folders trained on the same base are loaded together on one copy of it (the inference engine's
multi-adapter loading), and the base itself is served by the same engine with its adapters disabled: a
plain model listed beside adapters of which it is the base is evaluated as those adapters see it (same
precision), unless its `bits` asks for another. Every other model is an engine of its own. Engines are
loaded one at a time, evaluated on every task, and released before the next, so only one base is ever in
memory.

A model's fingerprint (part of every cache key) hashes the small files of its folder (adapter weights,
configs, tokenizer and template) and the names, sizes and modification times of the large ones (base
weights), so changed weights never reuse old results.
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import json
from collections.abc import Iterator
import logging
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from loratune.decoder.model import Decoder
from loratune.errors import LoratuneError
from loratune.eval import decoder_view
from loratune.eval.config import EvalModelConfig
from loratune.infer.load import Engine, RunFolder, is_run_folder, load_engine, read_run_folder
from loratune.model.load import resolve_model_path

log = logging.getLogger("loratune.eval")

SMALL = 64 << 20  # files hashed by content; larger ones by name, size and modification time


@dataclass(frozen=True)
class Source:
    """A model as the eval sees it: its spec, resolved path, run folder (adapters), base and precision."""

    spec: EvalModelConfig
    path: str
    run: RunFolder | None
    base: str
    bits: int


def _plain_bits(path: str) -> int:
    config = Path(path) / "config.json"
    q = json.loads(config.read_text(encoding="utf-8")).get("quantization_config") if config.is_file() else None
    if q and q.get("quant_method") == "bitsandbytes":
        return 8 if q.get("load_in_8bit") else 4
    return 16


def describe(spec: EvalModelConfig) -> Source:
    path = resolve_model_path(spec.path)
    if is_run_folder(path):
        run = read_run_folder(path)
        return Source(spec, path, run, resolve_model_path(run.cfg.model.path), spec.bits or run.cfg.quantization.bits)
    return Source(spec, path, None, path, spec.bits or _plain_bits(path))


def plan(specs: list[EvalModelConfig]) -> list[list[Source]]:
    """Groups of models loaded together (a group's plain base first), in the order of their first member.

    A plain model joins the adapters it is the base of: one whose `bits` names their precision first, else
    one without `bits` (evaluated at their precision); any other plain model is loaded on its own.
    """
    sources = [describe(s) for s in specs]
    adapter_keys = list(dict.fromkeys((s.base, s.bits) for s in sources if s.run is not None))
    keys: dict[str, tuple] = {s.spec.name: (s.base, s.bits) for s in sources if s.run is not None}
    taken: set[tuple] = set()
    plain = [s for s in sources if s.run is None]
    for s in sorted(plain, key=lambda p: p.spec.bits is None):  # explicit precisions choose first
        key = next((k for k in adapter_keys if k[0] == s.path and s.spec.bits in (None, k[1]) and k not in taken), None)
        if key is not None:
            taken.add(key)
        keys[s.spec.name] = key or ("plain", s.spec.name)
    groups: dict[tuple, list[Source]] = {}
    for s in sources:
        key = keys[s.spec.name]
        groups.setdefault(key, []).append(replace(s, bits=key[1]) if s.run is None and key[0] != "plain" else s)
    return [sorted(g, key=lambda m: m.run is not None) for g in groups.values()]


@dataclass
class Loaded:
    """An engine, the engine name under which each eval model of its group is served, and each one's adapter
    folder (None: a plain model)."""

    engine: Engine
    names: dict[str, str]  # eval model name -> engine name
    folders: dict[str, str | None] = field(default_factory=dict)
    transformers_only: bool = False  # implementation=transformers asked for: no decoder view either
    _decoder: Decoder | None | bool = False  # loratune's decoder over the engine's base; False: not built yet

    def decoder(self) -> Decoder | None:
        """loratune's decoder over the engine's base tensors (built once), or None where it does not cover it."""
        if self._decoder is False:
            self._decoder = decoder_view.decoder_over(self.engine.model)
            if self._decoder is not None:
                log.info("log-likelihoods are scored on loratune's decoder over the loaded base")
        return self._decoder  # type: ignore[return-value]


def load(group: list[Source], implementation: str | None = None) -> Loaded:
    """Load a group's base once with its adapters; `implementation` (auto | loratune | transformers; None: as
    training decides) picks the engine's model code (`loratune.infer.load.load_engine`)."""
    plain = [s for s in group if s.run is None]
    adapters = [s for s in group if s.run is not None]
    taken = {s.spec.name for s in adapters}
    base_name = plain[0].spec.name if plain else next(n for n in ("base", "_base", "__base") if n not in taken)
    if adapters:  # one precision for the group (`plan` put only models of the same precision together)
        engine = load_engine([f"{s.spec.name}={s.path}" for s in adapters], bits=adapters[0].bits, base_name=base_name,
                             implementation=implementation)
    else:
        engine = load_engine([plain[0].path], bits=plain[0].spec.bits, base_name=base_name,
                             implementation=implementation)
    return Loaded(engine, {s.spec.name: s.spec.name for s in group},
                  {s.spec.name: s.path if s.run is not None else None for s in group},
                  transformers_only=implementation == "transformers")


def release(loaded: Loaded) -> None:
    """Drop the engine's model so the next group's base has the memory."""
    loaded.engine.model = None  # type: ignore[assignment]
    loaded._decoder = None
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


@contextlib.contextmanager
def selected(engine: Engine, name: str) -> Iterator[torch.nn.Module]:
    """The engine's model answering as `name` (its adapter active, or all disabled for the base), for scoring
    outside `Engine.generate` (`Engine.use`: the engine's lock is held, as generation holds it)."""
    with engine.use(name) as model:
        yield model


@contextlib.contextmanager
def scoring(loaded: Loaded, model: str) -> Iterator[torch.nn.Module]:
    """The network that scores log-likelihoods as eval model `model`: the engine's own model when it is loratune's
    decoder (or implementation=transformers), else loratune's decoder over the engine's base with the model's
    adapter where the decoder covers it (`decoder_view`), else the engine's transformers model."""
    # an engine on the decoder answers as any of its models through `selected`; so does a transformers engine when
    # implementation=transformers was asked for
    on_decoder = isinstance(loaded.engine.model, Decoder)
    decoder = None if on_decoder or loaded.transformers_only else loaded.decoder()
    if decoder is not None:
        try:
            decoder_view.use_adapter(decoder, loaded.folders.get(model))
        except LoratuneError as e:
            log.info("%s is scored by transformers, not loratune's decoder: %s", model, e)
        else:
            with loaded.engine.use():  # the base's tensors are the engine's: no generation meanwhile
                yield decoder
            return
    with selected(loaded.engine, loaded.names[model]) as net:
        yield net


def fingerprint(src: Source) -> str:
    """A hash of what the model's outputs depend on: its folder's files, its base's and its precision."""
    h = hashlib.sha256(json.dumps({"bits": src.bits, "path": src.spec.path}).encode())
    for folder in dict.fromkeys([src.path, src.base]):
        p = Path(folder)
        if not p.is_dir():  # a hub id: its name (and the cache's revision) stand for it
            h.update(folder.encode())
            continue
        for f in sorted(x for x in p.iterdir() if x.is_file()):
            st = f.stat()
            h.update(f"{f.name}:{st.st_size}".encode())
            if st.st_size <= SMALL:
                h.update(f.read_bytes())
            else:
                h.update(str(st.st_mtime_ns).encode())
    return h.hexdigest()[:16]
