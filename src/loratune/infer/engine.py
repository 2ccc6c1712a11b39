"""The one generation engine: prompts of token ids in, tokens (then text) out, streamed step by step.

Built as an explicit loop over a step function rather than on `model.generate`: streaming, per-row stop
strings, cancellation between steps, a private random generator per request and adapter switching are
each a line here, and each would be a callback or a subclass around `generate`.

Three layers:
- a `Stepper` runs the model: `prefill(prompts)` and `step(rows, tokens)`, each returning the logits of
  the newest token of the rows it was given. `DecoderStepper` drives loratune's decoder
  (`loratune.decoder.generate.SlotDecoder`): the prompts laid end to end with their boundaries into the
  slots of a preallocated KV cache, no padding, and each step feeds only the rows still decoding (the
  shape a CUDA-graphed step per batch bucket and continuous batching build on). `HFStepper` drives a
  transformers model (the fallback for architectures the decoder does not cover): prompts left-padded
  into one batch, one `transformers.DynamicCache` made before the prefill, which fills it, and passed to
  every later step. transformers renamed that argument `past_key_values` to `cache` within the versions
  we support (5.24 warns on the old name, 5.40 removes it; 5.17 knows only the old one), so the keyword
  is read from the model's own forward signature, and a cache still empty after the prefill is an error
  rather than answers decoded without context. Padding is masked by position (pad may equal eos).
- `decode_steps` knows a model and token ids: sampling (`loratune.infer.sampling`), stop tokens, the
  token budget, cancellation. It is tested with a mock model and against transformers on real ones.
- `generate_text` adds a tokenizer's decode: incremental detokenisation and stop strings per row, and
  yields `Delta` events (text pieces) and `Finish` events (reason and token counts).
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
from transformers import DynamicCache

from loratune.decoder.generate import SlotDecoder
from loratune.decoder.model import Decoder
from loratune.infer.detok import IncrementalDetokenizer, StopStrings
from loratune.infer.sampling import SamplingParams, make_generator, next_tokens
from loratune.model.adapters import is_peft

Cancel = Callable[[], bool]


def _never() -> bool:
    return False


@dataclass(frozen=True)
class Delta:
    """New text of row `row` (may be empty when a token completed no character yet)."""

    row: int
    text: str
    token_id: int | None  # None for text released at the end (held back until then)


@dataclass(frozen=True)
class Finish:
    """Row `row` is done. reason: "stop" (stop token or string), "length" or "cancelled"."""

    row: int
    reason: str
    prompt_tokens: int
    completion_tokens: int
    stop: str | int | None = None  # the stop string or token id that ended it


class DecodeState:
    """Per-batch bookkeeping the caller may act on: `finish(row)` ends a row (e.g. on a stop string)."""

    def __init__(self, batch: int) -> None:
        self.done = [False] * batch

    def finish(self, row: int) -> None:
        self.done[row] = True


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, mask) of shape (B, T): prompts right-aligned so every row's next token is at column T."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long, device=device)
    mask = torch.zeros((len(prompts), width), dtype=torch.long, device=device)
    for i, p in enumerate(prompts):
        if p:
            ids[i, width - len(p):] = torch.tensor(list(p), dtype=torch.long, device=device)
            mask[i, width - len(p):] = 1
    return ids, mask


def new_cache(model: torch.nn.Module) -> DynamicCache:
    """An empty KV cache shaped by the model's own config (sliding-window layers and all), when it has one."""
    config = getattr(model, "config", None)
    return DynamicCache(config=config) if hasattr(config, "get_text_config") else DynamicCache()


def cache_keyword(model: torch.nn.Module) -> str:
    """The forward's name for the KV cache: `cache` (transformers >= the rename) or `past_key_values`.

    Read from the signature of the transformers model's forward (under a peft wrapper, whose forward takes
    **kwargs); transformers' deprecation wrapper keeps the real signature visible (`functools.wraps`).
    """
    inner = model.get_base_model() if is_peft(model) else model
    params = inspect.signature(inner.forward).parameters
    return "past_key_values" if "past_key_values" in params and "cache" not in params else "cache"


def _device(model: torch.nn.Module) -> torch.device:
    try:
        return next(model.parameters()).device
    except (StopIteration, AttributeError):
        return torch.device("cpu")


class Stepper(Protocol):
    """What the decode loop drives: rows are the prompts' indices; each call returns the logits [rows, V] of
    every given row's newest token."""

    device: torch.device

    def prefill(self, prompts: Sequence[Sequence[int]]) -> torch.Tensor: ...

    def step(self, rows: Sequence[int], tokens: torch.Tensor) -> torch.Tensor: ...


class DecoderStepper:
    """loratune's decoder: prompts laid end to end into the slots of its preallocated KV cache (no padding);
    each step feeds only the rows still decoding."""

    def __init__(self, decoder: Decoder, rows: int, capacity: int) -> None:
        self.slots = SlotDecoder(decoder, rows, capacity)
        self.device = self.slots.device

    def prefill(self, prompts: Sequence[Sequence[int]]) -> torch.Tensor:
        return self.slots.prefill(range(len(prompts)), prompts)

    def step(self, rows: Sequence[int], tokens: torch.Tensor) -> torch.Tensor:
        return self.slots.step(rows, tokens)


class HFStepper:
    """A transformers (or peft) model: prompts left-padded into one batch; one `DynamicCache` made before the
    prefill, which fills it, and passed to every later step, which feeds one token per row (every row: the
    cache's rows are fixed) and appends to it in place. Padding is masked by position (pad may equal eos)."""

    def __init__(self, model: torch.nn.Module, pad_id: int) -> None:
        self.model, self.pad_id = model, pad_id
        self.device = _device(model)
        self.cache = new_cache(model)
        self.keyword = cache_keyword(model)
        self.last: torch.Tensor | None = None

    def _forward(self, ids: torch.Tensor) -> torch.Tensor:
        out = self.model(input_ids=ids, attention_mask=self.mask, position_ids=self.positions, use_cache=True,
                         logits_to_keep=1, **{self.keyword: self.cache})
        return out.logits[:, -1, :]

    def prefill(self, prompts: Sequence[Sequence[int]]) -> torch.Tensor:
        ids, self.mask = left_pad(prompts, self.pad_id, self.device)
        self.lengths = self.mask.sum(dim=1)  # real tokens per row so far = position of the next token
        self.positions = (self.mask.cumsum(dim=1) - 1).clamp(min=0)
        logits = self._forward(ids)
        if self.cache.get_seq_length() == 0:
            raise RuntimeError(f"{type(self.model).__name__} did not fill the KV cache passed as `{self.keyword}`")
        self.last = ids[:, -1].clone()
        return logits

    def step(self, rows: Sequence[int], tokens: torch.Tensor) -> torch.Tensor:
        assert self.last is not None
        index = torch.tensor(list(rows), dtype=torch.long, device=self.device)
        self.last[index] = tokens.to(self.device)  # finished rows repeat their last token; their logits are dropped
        self.mask = torch.cat([self.mask, torch.ones_like(self.mask[:, :1])], dim=1)
        self.positions = self.lengths.unsqueeze(1).clone()
        self.lengths = self.lengths + 1
        return self._forward(self.last.unsqueeze(1))[index]


def stepper_for(model: torch.nn.Module, prompts: Sequence[Sequence[int]], budget: int, pad_id: int) -> Stepper:
    """loratune's decoder steps over its own KV cache; any other model through transformers' forward."""
    if isinstance(model, Decoder):
        return DecoderStepper(model, len(prompts), max(len(p) for p in prompts) + max(budget, 1))
    return HFStepper(model, pad_id)


@torch.inference_mode()
def decode_steps(model: torch.nn.Module, prompts: Sequence[Sequence[int]], params: SamplingParams, *,
                 stop_ids: frozenset[int], pad_id: int, state: DecodeState | None = None,
                 cancel: Cancel = _never, max_total: int | None = None) -> Iterator[list[int | None]]:
    """Yield, per step, the new token of every row (None for rows already done).

    A row is done after it produced a token in `stop_ids` (that token is still yielded), when the caller
    calls `state.finish(row)`, after `params.max_new_tokens`, or when prompt + answer reach `max_total`.
    The loop ends when every row is done or `cancel()` returns true (checked before each forward).
    """
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    state = state or DecodeState(len(prompts))
    budget = params.max_new_tokens
    if max_total is not None:
        budget = min(budget, max_total - max(len(p) for p in prompts))
    if budget <= 0:
        return
    with contextlib.ExitStack() as stack:
        if isinstance(model, Decoder):  # adapter weights fixed for the answer: cast once, not every step
            stack.enter_context(model.frozen_adapters())
        stepper = stepper_for(model, prompts, budget, pad_id)
        sampler = Sampler(prompts, params, stepper.device)
        new: list[int] = []
        rows: list[int] = []
        for i in range(budget):
            if cancel() or all(state.done):
                return
            if i == 0:
                logits = stepper.prefill(prompts)
                rows = [r for r in range(len(prompts)) if not state.done[r]]
                logits = logits[torch.tensor(rows, device=logits.device)]
            else:
                last = dict(zip(rows, new))
                rows = [r for r in rows if not state.done[r]]
                logits = stepper.step(rows, torch.tensor([last[r] for r in rows], dtype=torch.long))
            new = sampler.sample(rows, logits)
            host = dict(zip(rows, new))
            step: list[int | None] = []
            for row in range(len(prompts)):
                token = host.get(row)
                step.append(token)
                if token is not None and token in stop_ids:
                    state.finish(row)
            yield step


class Sampler:
    """One request's sampling state: its settings, its private random generator, and the tokens each row has
    seen (prompt and answer, for the repetition penalty)."""

    def __init__(self, prompts: Sequence[Sequence[int]], params: SamplingParams, device: torch.device) -> None:
        self.prompts, self.params, self.device = prompts, params, device
        self.generator = make_generator(params.seed, device)
        self.seen: torch.Tensor | None = None  # (rows, V), made at the first logits (which give V)

    def sample(self, rows: Sequence[int], logits: torch.Tensor) -> list[int]:
        """The next token of each of `rows` from their logits [len(rows), V]."""
        if self.seen is None:
            self.seen = torch.zeros((len(self.prompts), logits.shape[-1]), dtype=torch.bool, device=self.device)
            for r, p in enumerate(self.prompts):
                self.seen[r, torch.tensor(list(p), dtype=torch.long, device=self.device)] = True
        index = torch.tensor(list(rows), dtype=torch.long, device=self.device)
        new = next_tokens(logits.to(self.device), self.seen[index], self.params, self.generator)
        if self.params.repetition_penalty != 1.0:
            self.seen[index, new] = True
        return new.tolist()


class TextRows:
    """One request's rows as text: tokens in, `Delta`/`Finish` events out. Incremental detokenisation and stop
    strings per row; stop tokens never appear in the text, stop strings neither; held-back text is released
    when a row ends otherwise."""

    def __init__(self, prompts: Sequence[Sequence[int]], params: SamplingParams,
                 decode: Callable[[Sequence[int]], str], stop_ids: frozenset[int]) -> None:
        self.prompt_tokens = [len(p) for p in prompts]
        self.max_new_tokens, self.stop_ids = params.max_new_tokens, stop_ids
        self.detoks = [IncrementalDetokenizer(decode) for _ in prompts]
        self.stops = [StopStrings(params.stop) for _ in prompts]
        self.counts = [0] * len(prompts)
        self.finished = [False] * len(prompts)

    def push(self, row: int, token: int) -> list[Delta | Finish]:
        """Row `row` produced `token`: its text, and its `Finish` when this token ended it."""
        self.counts[row] += 1
        if token in self.stop_ids:
            return self.finish(row, "stop", token)
        events: list[Delta | Finish] = [Delta(row, self.stops[row].feed(self.detoks[row].push(token)), token)]
        if self.stops[row].hit is not None:
            events += self.finish(row, "stop", self.stops[row].hit)
        elif self.counts[row] >= self.max_new_tokens:
            events += self.finish(row, "length")
        return events

    def finish(self, row: int, reason: str, stop: str | int | None = None) -> list[Delta | Finish]:
        events: list[Delta | Finish] = []
        if reason != "stop" or isinstance(stop, int):  # flush held-back text unless a stop string ended it
            tail = self.stops[row].feed(self.detoks[row].flush()) + self.stops[row].flush()
            if tail:
                events.append(Delta(row, tail, None))
        self.finished[row] = True
        return events + [Finish(row, reason, self.prompt_tokens[row], self.counts[row], stop)]

    def close(self, reason: str) -> list[Delta | Finish]:
        """End every open row with `reason`."""
        return [e for row, done in enumerate(self.finished) if not done for e in self.finish(row, reason)]


def generate_text(model: torch.nn.Module, prompts: Sequence[Sequence[int]], params: SamplingParams, *,
                  decode: Callable[[Sequence[int]], str], stop_ids: frozenset[int], pad_id: int,
                  cancel: Cancel = _never, max_total: int | None = None) -> Iterator[Delta | Finish]:
    """Stream `Delta`s and one `Finish` per row; stop tokens never appear in the text, stop strings neither."""
    state = DecodeState(len(prompts))
    text = TextRows(prompts, params, decode, stop_ids)
    for step in decode_steps(model, prompts, params, stop_ids=stop_ids, pad_id=pad_id, state=state,
                             cancel=cancel, max_total=max_total):
        for row, token in enumerate(step):
            if token is None or text.finished[row]:
                continue
            yield from text.push(row, token)
            if text.finished[row]:
                state.finish(row)
    yield from text.close("cancelled" if cancel() else "length")  # rows still open ran out of room or were cancelled
