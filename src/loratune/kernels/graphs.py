"""One CUDA graph per micro-batch shape of loratune's decoder: the forward and backward pass replayed.

Why: with the fused kernels the GPU work of a QLoRA step on an 8B model is short enough that the host
needs longer than that to issue it: thousands of launches, each behind Python (modules, checkpointing,
autograd). Captured once into a CUDA graph, the whole micro-batch (input embedding, decoder with
checkpointing, head and loss, backward into the adapters' `.grad`) is one `replay()`; the host is then idle
and the step runs at the GPU's speed.

What is replayed: loratune's decoder on padding-free streams (input_ids, labels, position_ids) padded to the
token budget, so every micro-batch has one shape; the loss function derives the sample boundaries from the
position ids on the GPU (`loratune.decoder.attention.Boundaries.on_device`), so one graph serves every stream
of that shape. The decoder computes in its own dtype (no autocast) and casts its adapters itself (its
`frozen_adapters()`). An input embedding kept in host memory is looked up outside the graph: its rows,
gathered on the host ids, are one more static input (`inputs`; loratune.train.runner.host_embeds). The
transformers + peft fallback is never graphed: it runs as transformers and peft ship, eagerly.

When it applies (else the caller runs the micro-batch eagerly):
- CUDA, `model.cuda_graphs` auto/true, no loss scaler (bf16 or fp32 compute), not in deterministic mode, no
  NEFTune noise (`graphs_wanted`); adapter dropout is replayed (see Randomness below);
- the same shape was seen in the previous micro-batch.
The first micro-batch of a shape runs eagerly (warm-up: Triton compilation, cuBLAS/cuDNN plans), the
second eagerly too, timed; at the third the shape is captured (after one more warm-up pass on a side
stream with a zero loss scale, which adds nothing to the gradients) and one replay with a zero loss
scale is timed. The graph is kept only if it beats the eager time; later micro-batches only replay.
One graph is kept: a new shape that repeats replaces it (its memory pool is freed). A capture that
fails (an operation that synchronises with the host, say) is logged and that shape stays eager.
The caller must hold no autograd graph of an earlier micro-batch (a loss tensor) during `run`: its
gradient-accumulation nodes belong to the default stream and would break the capture.

Gradients: the graph accumulates into each trainable parameter's `.grad` tensor, whose address is
fixed at capture. `run` re-attaches those tensors if someone replaced or cleared `.grad` (zeroing
them when cleared), so `optimizer.zero_grad(set_to_none=True)` stays correct.
The loss is computed over every row (no host-side dropping of unsupervised rows, which would need a
sync); the sum is the same.

Randomness (adapter dropout): the graph is captured with the device's default generator registered (as
`torch.cuda.graph` does), so each replay reads that generator's seed and offset when it is launched and
advances the offset by what its kernels draw: the masks of a replay are the masks an eager pass would draw
from the same generator state, and the state after it the same. Activation checkpointing's recompute restores
the offset inside the graph as it does eagerly (same masks in the backward pass). The extra passes of a
capture (the side-stream warm-up, the capture itself, the timed replay) leave the generator as they found it
(`_choose` puts its state back), and the loop reseeds it before every micro-batch
(`loratune.train.dropout_seeds`), so the masks are a function of (seed, step, micro-batch) whether a
micro-batch ran eagerly or replayed, in an uninterrupted run or a resumed one.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import torch
from torch import Tensor, nn

log = logging.getLogger(__name__)


def graphs_wanted(cfg, device: str) -> bool:
    """Whether `loratune train` tries CUDA graphs for `cfg` on `device` ("cuda" or "cpu"): only where a replay
    is exact. Not in deterministic mode (bit-identical resume is promised there; replays and eager runs may
    round apart), not with fp16's loss scaler, not with NEFTune noise or S²-Attn (its masks are made per batch,
    eagerly). Adapter dropout is replayed (its masks reseeded per micro-batch, module docstring) only when
    model.cuda_graphs is true: `auto` keeps such runs eager until the replay is measured on a GPU. The memory
    plan asks the same question (loratune.model.memory)."""
    from loratune.model.quant import resolve_compute_dtype

    return (device == "cuda" and cfg.model.cuda_graphs is not False and not cfg.train.deterministic
            and resolve_compute_dtype(cfg.quantization.compute_dtype) != torch.float16
            and not cfg.train.neftune_alpha and not cfg.train.s2_attn
            and (not cfg.adapter.dropout or cfg.model.cuda_graphs is True))


def _flat_grads(params: list[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
    """Zeroed gradient tensors for `params`, views into one buffer per (device, dtype): the graph accumulates into
    them, and zeroing them all is one kernel. Returns (one view per parameter, the buffers)."""
    sizes: dict[tuple, int] = {}
    for p in params:
        key = (p.device, p.dtype)
        sizes[key] = sizes.get(key, 0) + p.numel()
    flat = {key: torch.zeros(n, dtype=key[1], device=key[0]) for key, n in sizes.items()}
    offsets = dict.fromkeys(flat, 0)
    views = []
    for p in params:
        key = (p.device, p.dtype)
        views.append(flat[key][offsets[key]:offsets[key] + p.numel()].view_as(p))
        offsets[key] += p.numel()
    return views, list(flat.values())


STREAM_KEYS = ("input_ids", "labels", "position_ids")  # a padding-free stream, as loratune.data.collate makes it


class GraphedMicroBatch:
    """`run(batch, scale)`: forward + `backward(loss_sum * scale)` of one micro-batch by graph replay, or None.

    `model`: loratune's decoder (anything with `parameters()`, `modules()` and a `frozen_adapters()` context);
    `loss_fn(model, batch)`: the summed token loss of a stream on the device, reading nothing back to the host;
    `inputs(batch)`: more static inputs made outside the graph from the host-side batch, as device tensors of a
    fixed shape per stream shape (the embedded ids of an input embedding kept in host memory), or {}."""

    def __init__(self, model: nn.Module, loss_fn: Callable[[nn.Module, dict[str, Tensor]], Tensor],
                 enabled: bool = True,
                 inputs: Callable[[dict[str, Tensor]], dict[str, Tensor]] | None = None) -> None:
        self.model, self.loss_fn, self.inputs = model, loss_fn, inputs or (lambda batch: {})
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.enabled = enabled and torch.cuda.is_available() and bool(self.params) and self.params[0].is_cuda
        self.graph: torch.cuda.CUDAGraph | None = None
        self.key: tuple | None = None
        self.last_key: tuple | None = None
        self.failed: set[tuple] = set()  # shapes that run eagerly (no graph captured, or none faster)
        self.static: dict[str, Tensor] = {}
        self.scale: Tensor | None = None
        self.loss: Tensor | None = None
        self.grads: list[Tensor] = []
        self.flat: list[Tensor] = []  # the buffers behind `grads` (see _flat_grads)
        self.replays = 0
        self.sightings = 0  # consecutive micro-batches of the current shape
        self.timing = False  # the caller's next eager micro-batch is timed (see eager_took)
        self.eager_seconds = float("inf")

    # ---------------------------------------------------------------------------------------- policy

    def _key(self, batch: dict[str, Tensor]) -> tuple | None:
        """The shape and keys of a stream (its boundaries are read on the GPU); None: not a stream, run eagerly."""
        if not self.enabled or set(batch) != set(STREAM_KEYS):
            return None
        return tuple(batch["input_ids"].shape), STREAM_KEYS

    def run(self, batch: dict[str, Tensor], scale: float) -> Tensor | None:
        """Replay (capturing first when due) for this host-side batch; None: run it eagerly instead.

        After a None the caller runs the micro-batch eagerly and reports its wall time with `eager_took`.
        """
        key = self._key(batch)
        if key != self.last_key:
            self.sightings, self.eager_seconds = 0, float("inf")
        self.last_key, self.timing = key, False
        if key is None or key in self.failed:
            return None
        if key != self.key:
            self.sightings += 1
            if self.sightings < 3:  # 1: warm-up, 2: timed eager run
                self.timing = self.sightings == 2
                return None
            if not self._choose(key, batch):
                return None
        return self._replay(batch, scale)

    def eager_took(self, seconds: float) -> None:
        """Wall time of the eager micro-batch the last `run` declined (synchronised by the caller)."""
        if self.timing:
            self.eager_seconds = seconds

    def _replay(self, batch: dict[str, Tensor], scale: float) -> Tensor:
        self._bind_grads()
        sources = {**batch, **self.inputs(batch)}
        for k, t in self.static.items():
            src = sources[k]
            # from pinned memory the copy is queued without waiting (a pageable source syncs the stream first)
            t.copy_(src if src.is_cuda else src.pin_memory(), non_blocking=True)
        self.scale.fill_(scale)
        self.graph.replay()
        self.replays += 1
        return self.loss

    def _choose(self, key: tuple, batch: dict[str, Tensor]) -> bool:
        """Capture this shape and time one replay; keep the graph only if it beats the eager time. The default
        generator is left as found (the warm-up and timed replay draw dropout masks of their own)."""
        dev = self.params[0].device
        rng = torch.cuda.get_rng_state(dev)
        try:
            return self._capture_and_time(key, batch)
        finally:
            torch.cuda.set_rng_state(rng, dev)

    def _capture_and_time(self, key: tuple, batch: dict[str, Tensor]) -> bool:
        if self._capture(key, batch):
            seconds = self._time_replay(batch)
            log.info("CUDA graph for shape %s: %.1f ms per micro-batch (eager %.1f ms)", key[0], 1e3 * seconds,
                     1e3 * self.eager_seconds)
            if seconds < self.eager_seconds:
                log.info("captured a CUDA graph for micro-batches of shape %s", key[0])
                return True
            self._release()
            log.info("micro-batches of shape %s run eagerly (the captured graph was not faster)", key[0])
        self.failed.add(key)
        return False

    def _time_replay(self, batch: dict[str, Tensor]) -> float:
        torch.cuda.synchronize()
        t = time.perf_counter()
        self._replay(batch, 0.0)  # a zero loss scale adds nothing to the gradients
        torch.cuda.synchronize()
        self.replays -= 1
        return time.perf_counter() - t

    # ---------------------------------------------------------------------------------------- capture

    def _forward_backward(self) -> Tensor:
        with self.model.frozen_adapters():  # fresh adapter casts, made inside the graph
            loss = self.loss_fn(self.model, dict(self.static))
            (loss * self.scale).backward()
        return loss.detach()

    def zero_grads(self) -> bool:
        """Zero the gradients in place when they are still the graph's (one kernel per buffer); False: nothing
        done, the caller zeroes them itself (`optimizer.zero_grad`). Cheaper on the host than setting them to
        None, which makes the next replay zero and re-attach 448 tensors one by one."""
        if not self.flat or any(p.grad is not g for p, g in zip(self.params, self.grads)):
            return False
        self._zero_flat()
        return True

    def _zero_flat(self) -> None:
        for buf in self.flat:  # one kernel per buffer (a foreach zero of hundreds of tensors costs more host time)
            buf.zero_()

    def _bind_grads(self) -> None:
        cleared = [g for p, g in zip(self.params, self.grads) if p.grad is None]
        if len(cleared) == len(self.grads) and self.flat:  # after zero_grad(set_to_none=True)
            self._zero_flat()
        elif cleared:
            torch._foreach_zero_(cleared)
        for p, g in zip(self.params, self.grads):
            if p.grad is not g:
                if p.grad is not None:
                    g.copy_(p.grad)
                p.grad = g

    def _release(self) -> None:
        self.graph, self.key, self.loss, self.static, self.scale = None, None, None, {}, None

    def _capture(self, key: tuple, batch: dict[str, Tensor]) -> bool:
        self._release()
        torch.cuda.empty_cache()
        dev = self.params[0].device
        self.static = {k: batch[k].to(dev).clone() for k in key[1]}
        self.static.update({k: v.to(dev).clone() for k, v in self.inputs(batch).items()})
        self.scale = torch.zeros((), dtype=torch.float32, device=dev)
        self.grads, self.flat = _flat_grads(self.params)
        for p, g in zip(self.params, self.grads):
            if p.grad is not None:
                g.copy_(p.grad)
            p.grad = g
        try:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):  # warm-up on a side stream (lazy inits stay out of the graph)
                self._forward_backward()  # scale 0: adds nothing to the gradients
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, capture_error_mode="thread_local"):
                loss = self._forward_backward()
        except Exception as e:  # noqa: BLE001 - any capture failure means: run this shape eagerly
            self._release()
            torch.cuda.synchronize()
            log.warning("CUDA graph capture failed for micro-batches of shape %s (%s: %s); they run eagerly",
                        key[0], type(e).__name__, str(e).splitlines()[0][:200] if str(e) else "")
            return False
        self.graph, self.key, self.loss = graph, key, loss
        torch.cuda.empty_cache()  # the side-stream warm-up's cached blocks: the main stream cannot reuse them
        return True
