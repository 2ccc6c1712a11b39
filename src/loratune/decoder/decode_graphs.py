"""Decode steps replayed from CUDA graphs, one per (batch bucket, key bucket); the same steps run eagerly on CPU.

Why: a decode step of an 8B model launches about 600 small kernels; issued from Python each costs more host
time than its GPU time, so a step without graphs runs at the host's speed. Captured once, a step is one
`replay()`.

`DecodeRunner.step(slots, tokens)` pads the rows to the next batch bucket (1, 2, 4, 8, 16, 32; more rows go
in pieces of 32) by repeating the first row (same slot, token and position: the padding rows write the
same keys and values to the same place), picks the key bucket (the next power of two >= the longest row's
length + 1, at least 64, at most the cache's capacity; with the Triton decode attention, which reads each
row up to its own position, the capacity: one graph per batch bucket), copies slots and tokens into the bucket's static
device tensors and runs `decode_step.decode_step` on them: eagerly for the first `EAGER_STEPS` steps of a
(bucket, key bucket), then captured into a graph on CUDA (after a warm-up run on a side stream, whose
advanced lengths are put back) and replayed from then on. Each generation makes its own runner, so an
answer of a few tokens never pays for a capture (about as long as a few eager steps); a capture that fails
is logged and that key stays eager. Off CUDA, or with `graphs=False`, the same function runs eagerly
on the same padded inputs, so CPU tests cover the logic the graphs hold. The logits of the real rows are
returned (a view of the graph's output: read them before the next step). All graphs of a runner share one
memory pool, so a runner's graphs hold about one step's activations, not one per (bucket, key bucket).

The graphs read the adapter casts of `StepWeights` and the cache's tensors by address; when the decoder's
adapters change (another adapter put on, weights edited) the casts are made again and every graph is
dropped (captured again on demand). Rows on several adapters in one pass (`decoder.multi_lora`) are padded
like the others, the row plan extended with copies of the first row's adapter, when the bucket takes the
stacked product (every resident adapter side by side, a per-row mask in a buffer the plan keeps and rewrites
when the pass starts): such steps are captured too, per (bucket, key bucket) and stack version (a graph of a
mixed step is dropped once an adapter is put on or dropped). Larger mixed passes step eagerly and unpadded.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Sequence

import torch
from torch import Tensor

from loratune.decoder.cache import KVCache
from loratune.decoder.decode_step import StepWeights, attention_kernel, decode_step, mixed_rows
from loratune.decoder.model import Decoder
from loratune.decoder.multi_lora import RowPlan

log = logging.getLogger(__name__)

BUCKETS = (1, 2, 4, 8, 16, 32)
MIN_KEYS = 64
EAGER_STEPS = 2  # steps of a (bucket, key bucket) run eagerly before it is captured: short answers never capture


def batch_bucket(rows: int) -> int:
    """The smallest bucket holding `rows` (1 <= rows <= 32)."""
    return next(b for b in BUCKETS if b >= rows)


def key_bucket(longest: int, capacity: int) -> int:
    """Keys attended for rows whose longest holds `longest` tokens after this step."""
    return min(capacity, max(MIN_KEYS, 1 << max(longest - 1, 0).bit_length()))


class _Graph:
    """One captured step: its static inputs (slots, tokens) and its output logits."""

    def __init__(self, slots: Tensor, tokens: Tensor) -> None:
        self.slots, self.tokens = slots, tokens
        self.graph: torch.cuda.CUDAGraph | None = None
        self.logits: Tensor | None = None
        self.steps = 0  # steps taken with this key (the first `DecodeRunner.eager_steps` run eagerly)
        self.failed = False  # the capture failed: eager for good


class DecodeRunner:
    """Decode steps of `decoder` over `cache` (see the module docstring). `graphs`: None = on CUDA."""

    def __init__(self, decoder: Decoder, cache: KVCache, graphs: bool | None = None) -> None:
        self.decoder, self.cache = decoder, cache
        self.device = cache.keys[0].device
        self.graphs = self.device.type == "cuda" if graphs is None else bool(graphs and self.device.type == "cuda")
        self.weights = StepWeights(decoder)
        # the Triton decode attention reads each row up to its own position: one graph per batch bucket serves
        # every length (the key bucket is then the capacity)
        self.kernel_attention = attention_kernel(decoder, self.device)
        self._captured: dict[tuple[int, int, int | None], _Graph] = {}  # (bucket, key bucket, stack version)
        self._pool = None  # one memory pool for every graph of this runner (see `_capture`)
        self.eager_steps = EAGER_STEPS
        self.captures = 0  # graphs captured so far (tests and benchmarks read it)

    def step(self, slots: Sequence[int], tokens: Tensor) -> Tensor:
        """Logits [len(slots), V] of one new token for each of these distinct slots (`tokens` [len(slots)])."""
        slots = [int(s) for s in slots]
        if not slots:
            raise ValueError("a decode step needs at least one row")
        if len(set(slots)) != len(slots) or any(not 0 <= s < self.cache.batch for s in slots):
            raise ValueError(f"slots {slots}: expected distinct slots in [0, {self.cache.batch})")
        empty = [s for s in slots if self.cache.lengths[s] == 0]
        if empty:
            raise ValueError(f"slots {empty} hold no prompt: prefill them first")
        tokens = tokens.reshape(-1).to(torch.long)
        if self.weights.refresh():
            self._captured.clear()
        # a row plan (several adapters) names the rows of the whole pass: one step, not pieces
        plan = self._row_plan()
        if plan is not None:
            stale = [k for k in self._captured if k[2] is not None and k[2] != plan.version]
            for k in stale:  # graphs of mixed steps over stacks that have changed since
                del self._captured[k]
            return self._step(slots, tokens, plan)
        outs = [self._step(slots[i:i + BUCKETS[-1]], tokens[i:i + BUCKETS[-1]], None)
                for i in range(0, len(slots), BUCKETS[-1])]
        return outs[0] if len(outs) == 1 else torch.cat(outs)

    def _row_plan(self) -> RowPlan | None:
        """The decoder's row plan when the pass in progress puts rows on adapters of their own, else None."""
        m = next((m for m in self.weights.modules if mixed_rows(m)), None)
        return None if m is None else m.mixed.plan

    def _step(self, slots: list[int], tokens: Tensor, plan: RowPlan | None) -> Tensor:
        n = len(slots)
        # a mixed step is padded (and may be captured) when its bucket takes the stacked product
        padded = plan is None or (n <= BUCKETS[-1] and batch_bucket(n) <= plan.stacked_tokens)
        bucket = batch_bucket(n) if padded else n
        assert plan is None or plan.current is not None
        rows = plan.rows(plan.current.padded(bucket)) if plan is not None else contextlib.nullcontext()
        with rows:
            return self._run(slots, tokens, bucket, None if plan is None else plan.version if padded else -1)

    def _run(self, slots: list[int], tokens: Tensor, bucket: int, version: int | None) -> Tensor:
        """The step of `slots` padded to `bucket` rows; `version`: the stack version of a mixed step (-1: one
        that is never captured), None for an unmixed one."""
        n = len(slots)
        kv_len = self.cache.capacity if self.kernel_attention else \
            key_bucket(max(self.cache.lengths[s] for s in slots) + 1, self.cache.capacity)
        self.cache.advanced(slots)  # checks the room first; the device lengths advance in the step itself
        host_slots = torch.tensor(slots + [slots[0]] * (bucket - n), dtype=torch.long)
        host_tokens = torch.cat([tokens.cpu(), tokens[:1].cpu().expand(bucket - n)])
        key = (bucket, kv_len, version)
        g = self._captured.get(key)
        if g is None:
            g = self._captured[key] = _Graph(torch.empty(bucket, dtype=torch.long, device=self.device),
                                             torch.empty(bucket, dtype=torch.long, device=self.device))
        g.steps += 1
        if version == -1 or not self.graphs or g.failed or g.steps <= self.eager_steps:
            return decode_step(self.decoder, self.cache, host_tokens.to(self.device), host_slots.to(self.device),
                               kv_len, self.weights)[:n]
        g.slots.copy_(host_slots, non_blocking=True)
        g.tokens.copy_(host_tokens, non_blocking=True)
        if g.graph is None and not self._capture(g, kv_len):
            return decode_step(self.decoder, self.cache, g.tokens, g.slots, kv_len, self.weights)[:n]
        assert g.graph is not None and g.logits is not None
        g.graph.replay()
        return g.logits[:n]

    def _capture(self, g: _Graph, kv_len: int) -> bool:
        """Warm up on a side stream (the lengths it advanced are put back), then capture the step. A capture
        that fails is logged and its key stays eager (False)."""
        try:
            self._record(g, kv_len)
        except RuntimeError as e:
            log.warning("decode step of %d rows over %d keys not captured (%s); it runs eagerly",
                        g.slots.numel(), kv_len, e)
            g.failed, g.graph, g.logits = True, None, None
            return False
        return True

    def _record(self, g: _Graph, kv_len: int) -> None:
        lengths = self.cache.device_lengths.clone()
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            try:
                decode_step(self.decoder, self.cache, g.tokens, g.slots, kv_len, self.weights)
            finally:
                self.cache.device_lengths.copy_(lengths)
        torch.cuda.current_stream(self.device).wait_stream(side)
        # The graphs share one memory pool: a replay may overwrite what another graph left in it, which is safe
        # here because replays run one after another on one stream and each one's logits are read before the
        # next replay (a graph's own output stays allocated: no other capture is given its memory).
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            g.logits = decode_step(self.decoder, self.cache, g.tokens, g.slots, kv_len, self.weights)
        g.graph = graph
        self.captures += 1
        log.debug("captured a decode step of %d rows over %d keys", g.slots.numel(), kv_len)
