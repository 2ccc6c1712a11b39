"""The one generation engine: prompts of token ids in, tokens (then text) out, streamed step by step.

Built as an explicit loop over the model's forward rather than on `model.generate`: streaming, per-row
stop strings, cancellation between steps, a private random generator per request and adapter switching
are each a line here, and each would be a callback or a subclass around `generate`.

Two layers:
- `decode_steps` knows only a model (anything whose forward takes input_ids, attention_mask,
  position_ids, cache, use_cache, logits_to_keep and returns `.logits`) and token ids. Prompts are
  left-padded into one batch; one `transformers.DynamicCache` is made before the first forward (prefill),
  which fills it, and the same object is passed to every later step, which feeds one token per row and
  appends to it in place. transformers renamed the argument `past_key_values` to `cache` within the
  versions we support (5.24 warns on the old name, 5.40 removes it; 5.17 knows only the old one), so the
  keyword is read from the model's own forward signature, and a cache still empty after the prefill is
  an error rather than answers decoded without context. Padding is masked by position (pad may equal
  eos). It is tested with a mock model.
- `generate_text` adds a tokenizer's decode: incremental detokenisation and stop strings per row, and
  yields `Delta` events (text pieces) and `Finish` events (reason and token counts).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
from transformers import DynamicCache

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
    device = _device(model)
    state = state or DecodeState(len(prompts))
    ids, mask = left_pad(prompts, pad_id, device)
    lengths = mask.sum(dim=1)  # real tokens per row so far = position of the next token
    positions = (mask.cumsum(dim=1) - 1).clamp(min=0)
    seen: torch.Tensor | None = None  # (B, V) tokens in prompt or answer, for the repetition penalty
    generator = make_generator(params.seed, device)
    budget = params.max_new_tokens
    if max_total is not None:
        budget = min(budget, max_total - int(lengths.max()))
    cache = new_cache(model)  # filled by the prefill, appended to in place by every step
    keyword = cache_keyword(model)
    for _ in range(max(budget, 0)):
        if cancel() or all(state.done):
            return
        out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, logits_to_keep=1,
                    **{keyword: cache})
        if seen is None and cache.get_seq_length() == 0:
            raise RuntimeError(f"{type(model).__name__} did not fill the KV cache passed as `{keyword}`")
        logits = out.logits[:, -1, :]
        if seen is None:
            counts = torch.zeros(logits.shape, dtype=torch.long, device=device)
            seen = counts.scatter_add_(1, ids, mask) > 0
        new = next_tokens(logits, seen, params, generator)
        host = new.tolist()
        step: list[int | None] = []
        for row, token in enumerate(host):
            if state.done[row]:
                step.append(None)
                continue
            step.append(token)
            if token in stop_ids:
                state.finish(row)
        if params.repetition_penalty != 1.0:
            seen[torch.arange(len(host), device=device), new] = True
        yield step
        ids = new.unsqueeze(1)
        mask = torch.cat([mask, torch.ones_like(ids)], dim=1)
        positions = lengths.unsqueeze(1).clone()
        lengths = lengths + 1


def generate_text(model: torch.nn.Module, prompts: Sequence[Sequence[int]], params: SamplingParams, *,
                  decode: Callable[[Sequence[int]], str], stop_ids: frozenset[int], pad_id: int,
                  cancel: Cancel = _never, max_total: int | None = None) -> Iterator[Delta | Finish]:
    """Stream `Delta`s and one `Finish` per row; stop tokens never appear in the text, stop strings neither."""
    state = DecodeState(len(prompts))
    detoks = [IncrementalDetokenizer(decode) for _ in prompts]
    stops = [StopStrings(params.stop) for _ in prompts]
    counts = [0] * len(prompts)
    finished = [False] * len(prompts)

    def finish(row: int, reason: str, stop: str | int | None = None) -> Iterator[Delta | Finish]:
        if reason != "stop" or isinstance(stop, int):  # flush held-back text unless a stop string ended it
            tail = stops[row].feed(detoks[row].flush()) + stops[row].flush()
            if tail:
                yield Delta(row, tail, None)
        finished[row] = True
        state.finish(row)
        yield Finish(row, reason, len(prompts[row]), counts[row], stop)

    for step in decode_steps(model, prompts, params, stop_ids=stop_ids, pad_id=pad_id, state=state,
                             cancel=cancel, max_total=max_total):
        for row, token in enumerate(step):
            if token is None or finished[row]:
                continue
            counts[row] += 1
            if token in stop_ids:
                yield from finish(row, "stop", token)
                continue
            yield Delta(row, stops[row].feed(detoks[row].push(token)), token)
            if stops[row].hit is not None:
                yield from finish(row, "stop", stops[row].hit)
            elif counts[row] >= params.max_new_tokens:
                yield from finish(row, "length")
    reason = "cancelled" if cancel() else "length"  # rows still open ran out of room (context) or were cancelled
    for row in range(len(prompts)):
        if not finished[row]:
            yield from finish(row, reason)
