"""Continuous batching on loratune's decoder: requests join and leave the running batch at step boundaries.

One `Batcher` owns a `SlotDecoder` (a KV cache of `slots` rows, preallocated) and the requests decoding in
it. Each `step()`:

    cancelled requests end ("cancelled"), their slots freed
    newly admitted requests: their prompts prefilled together (one stream, no padding) into free slots
    the rows already decoding: one token each, in one forward over their slots
    every request samples its rows with its own settings and generator (`engine.Sampler`) and turns the
    tokens into text events (`engine.TextRows`: stop tokens, stop strings, detokenisation), which go to its
    `emit`; a finished row frees its slot at once, a request whose rows all finished is returned as done

The rules are those of `engine.generate_text`, so a request answers the same in a batch as alone (greedy:
token for token; sampling: the same draws, its generator being its own).

Rows of one batch may answer as different adapters, or as the bare base. A pass whose rows all use one
adapter runs with it on the decoder's layers (`Engine.serving`: the fused LoRA path, the graphed decode
step); a pass mixing adapters runs with none on and each row's adapter applied by the segmented LoRA
product (`loratune.decoder.multi_lora`: the base product once, each adapter's update on its rows; a decode
step of up to 32 rows is still padded and graphed, `decoder.decode_graphs`). A request holds its adapter on the device from admission to its end
(`Engine.hold`), so the LRU of resident adapters never drops one in use; a request whose adapter finds no
room (every resident one held, `--max-adapters`) waits (`fits`), and the caller admits in arrival order.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from loratune.decoder.generate import SlotDecoder
from loratune.decoder.multi_lora import RowPlan
from loratune.errors import ModelError
from loratune.infer.engine import Cancel, Delta, Finish, Sampler, TextRows, _never
from loratune.infer.load import Engine
from loratune.infer.sampling import SamplingParams


@dataclass
class Submission:
    """One request: its prompts (token ids), settings, model name, and where its events go (`emit`, called
    on the batcher's thread). `tag` is the caller's (e.g. the server's job)."""

    prompts: list[list[int]]
    params: SamplingParams
    name: str
    emit: Callable[[Delta | Finish], None]
    cancel: Cancel = _never
    ignore_eos: bool = False
    tag: object = None


@dataclass
class _Running:
    sub: Submission
    key: str | None  # the adapter it answers with (held from admission to its end; None: the base)
    slots: list[int]  # slot of each row
    sampler: Sampler
    text: TextRows
    budget: int  # steps at most (the longest prompt's room in the context, as decode_steps counts it)
    steps: int = 0
    fresh: bool = True  # admitted, not prefilled yet
    last: dict[int, int] = field(default_factory=dict)  # row -> its newest token, to feed next

    def open_rows(self) -> list[int]:
        return [r for r, done in enumerate(self.text.finished) if not done]


class Batcher:
    """Requests decoding together on the engine's decoder, in `slots` rows of `capacity` tokens each (default:
    the model's context length)."""

    def __init__(self, engine: Engine, slots: int, capacity: int | None = None) -> None:
        if not engine.decoder:
            raise ModelError("continuous batching runs on loratune's decoder; this engine answers with "
                             f"transformers ({engine.why})")
        if slots < 1:
            raise ValueError(f"slots must be >= 1, got {slots}")
        self.engine = engine
        self.capacity = min(capacity or engine.context_length, engine.context_length)
        self.decoder = SlotDecoder(engine.model, slots, self.capacity)
        self.slots = slots
        self.free = list(range(slots))
        self.running: list[_Running] = []
        self.mixed_passes = 0  # passes whose rows used several adapters (tests and benchmarks read it)

    @property
    def empty(self) -> bool:
        return not self.running

    def fits(self, sub: Submission) -> bool:
        """Whether `sub` can join now: enough free slots, and room on the device for its adapter."""
        return len(sub.prompts) <= len(self.free) and self.engine.has_room(sub.name)

    def admit(self, sub: Submission) -> None:
        """Take `sub` into the batch (its prompts are prefilled at the next `step`). A name no longer served, or an
        adapter that cannot be read again from its folder, is a `ModelError` (the submission is not taken)."""
        if len(sub.prompts) > len(self.free):
            raise ValueError("the submission does not fit the running batch (see `fits`)")
        if not sub.prompts or any(not p for p in sub.prompts):
            raise ValueError("every prompt needs at least one token")
        fmt = self.engine.format(sub.name)
        key = self.engine.hold(sub.name)
        stop_ids = frozenset() if sub.ignore_eos else fmt.stop_ids
        budget = min(sub.params.max_new_tokens, self.capacity - max(len(p) for p in sub.prompts))
        slots = [self.free.pop(0) for _ in sub.prompts]
        self.running.append(_Running(sub, key, slots, Sampler(sub.prompts, sub.params, self.decoder.device),
                                     TextRows(sub.prompts, sub.params, fmt.decode, stop_ids), budget))

    def _end(self, run: _Running, events: list[Delta | Finish]) -> None:
        for e in events:
            run.sub.emit(e)
        self._release_finished(run)

    def _release_finished(self, run: _Running) -> None:
        for row, slot in enumerate(run.slots):
            if run.text.finished[row] and slot >= 0:
                self.decoder.release([slot])
                self.free.append(slot)
                run.slots[row] = -1

    def _take(self, run: _Running, rows: list[int], logits: torch.Tensor) -> None:
        """Sample `rows` of `run` from their logits, emit their events, free the slots of rows that finished."""
        tokens = run.sampler.sample(rows, logits)
        for row, token in zip(rows, tokens):
            run.last[row] = token
            for e in run.text.push(row, token):
                run.sub.emit(e)
        run.steps += 1
        if run.steps >= run.budget:
            for e in run.text.close("length"):
                run.sub.emit(e)
        self._release_finished(run)

    def step(self) -> list[Submission]:
        """One step of the whole batch (see the module docstring); returns the submissions that finished."""
        for run in self.running:
            if run.open_rows() and run.sub.cancel():
                self._end(run, run.text.close("cancelled"))
            elif run.fresh and run.budget <= 0:  # no room for a single token
                self._end(run, run.text.close("length"))
        live = [r for r in self.running if r.open_rows()]
        if live:
            keys = {r.key for r in live}
            with self.engine.serving(keys) as model, model.frozen_adapters(), torch.inference_mode():
                fresh = [r for r in live if r.fresh]
                going = [r for r in live if not r.fresh]
                if fresh:
                    prompts = [p for r in fresh for p in r.sub.prompts]
                    with self._rows(keys, [r.key for r in fresh for _ in r.sub.prompts], [len(p) for p in prompts]):
                        logits = self.decoder.prefill([s for r in fresh for s in r.slots], prompts)
                    start = 0
                    for r in fresh:
                        n = len(r.sub.prompts)
                        r.fresh = False
                        self._take(r, list(range(n)), logits[start:start + n])
                        start += n
                if going:
                    rows = [(r, row) for r in going for row in r.open_rows()]
                    slots = [r.slots[row] for r, row in rows]
                    tokens = torch.tensor([r.last[row] for r, row in rows], dtype=torch.long)
                    with self._rows(keys, [r.key for r, _ in rows], [1] * len(rows)):
                        logits = self.decoder.step(slots, tokens)
                    start = 0
                    for r in going:
                        n = len(r.open_rows())
                        self._take(r, r.open_rows(), logits[start:start + n])
                        start += n
        done = [r for r in self.running if not r.open_rows()]
        self.running = [r for r in self.running if r.open_rows()]
        for r in done:
            self.engine.release(r.key)
        return [r.sub for r in done]

    def _rows(self, keys: set[str | None], row_keys: list[str | None], lengths: list[int]):
        """The pass's rows on their adapters when the batch mixes several (else the adapter is on the layers)."""
        if len(keys) == 1:
            return contextlib.nullcontext()
        assert self.engine.bank is not None
        self.mixed_passes += 1
        return self.engine.bank.plan.rows(RowPlan.from_rows(row_keys, lengths, self.decoder.device))

    def fail(self) -> list[Submission]:
        """Drop every running request (after an error), freeing their slots; returns them."""
        subs = [r.sub for r in self.running]
        for r in self.running:
            for row in range(len(r.slots)):
                r.text.finished[row] = True
            self._release_finished(r)
            self.engine.release(r.key)
        self.running = []
        return subs

