"""One CUDA graph per micro-batch shape: the forward and backward pass replayed, not re-launched from Python.

Why: with the fused kernels the GPU work of a QLoRA step on an 8B model is ~380 ms at 2 x 2048 tokens,
but the host needs longer than that to issue it: thousands of launches, each behind Python (HF's
modules, peft, checkpointing, autograd). Captured once into a CUDA graph, the whole micro-batch (input
embedding, decoder with checkpointing, head and loss, backward into the adapters' `.grad`) is one
`replay()`; the host is then idle and the step runs at the GPU's speed.

When it applies (else the caller runs the micro-batch eagerly, as before):
- CUDA, `model.cuda_graphs` auto/true, no loss scaler (bf16 or fp32 compute), no active dropout (the
  randomness of a replayed graph is not what checkpoints restore: exact resume comes first);
- the batch holds input_ids, labels and either an all-ones attention mask (no padding) or the
  position ids of packed rows (padded to data.max_length, so every packed batch has one shape), and
  the same shape was seen in the previous micro-batch. Not in deterministic mode (train.run).
The first micro-batch of a shape runs eagerly (warm-up: Triton compilation, cuBLAS/cuDNN plans), the
second is captured (after one more warm-up pass on a side stream with a zero loss scale, which adds
nothing to the gradients) and replayed; later ones only replay. One graph is kept: a new shape that
repeats replaces it (its memory pool is freed). A capture that fails (an operation that synchronises
with the host, say) is logged once and that shape stays eager.

Gradients: the graph accumulates into each trainable parameter's `.grad` tensor, whose address is
fixed at capture. `run` re-attaches those tensors if someone replaced or cleared `.grad` (zeroing
them when cleared), so `optimizer.zero_grad(set_to_none=True)` stays correct.
The loss is computed over every row (no host-side dropping of unsupervised rows, which would need a
sync); the sum is the same.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
from torch import Tensor, nn

log = logging.getLogger(__name__)


def _has_dropout(model: nn.Module) -> bool:
    return any(isinstance(m, nn.Dropout) and m.p > 0 for m in model.modules())


class GraphedMicroBatch:
    """`run(batch, scale)`: forward + `backward(loss_sum * scale)` of one micro-batch by graph replay, or None."""

    def __init__(self, model: nn.Module, loss_fn: Callable[[nn.Module, dict[str, Tensor]], Tensor],
                 compute_dtype: torch.dtype | None, enabled: bool = True) -> None:
        self.model, self.loss_fn, self.compute_dtype = model, loss_fn, compute_dtype
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.enabled = enabled and torch.cuda.is_available() and bool(self.params) and self.params[0].is_cuda
        if self.enabled and _has_dropout(model):
            log.info("CUDA graphs off: the model has active dropout (adapter.dropout > 0)")
            self.enabled = False
        self.graph: torch.cuda.CUDAGraph | None = None
        self.key: tuple | None = None
        self.last_key: tuple | None = None
        self.failed: set[tuple] = set()
        self.static: dict[str, Tensor] = {}
        self.scale: Tensor | None = None
        self.loss: Tensor | None = None
        self.grads: list[Tensor] = []
        self.replays = 0

    # ---------------------------------------------------------------------------------------- policy

    def _key(self, batch: dict[str, Tensor]) -> tuple | None:
        if not self.enabled or set(batch) - {"input_ids", "labels", "attention_mask", "position_ids"}:
            return None
        mask = batch.get("attention_mask")
        if mask is not None and not bool(mask.all()):  # padding: eager (host tensors, no GPU sync)
            return None
        return tuple(batch["input_ids"].shape), tuple(sorted(k for k in batch if k != "attention_mask"))

    def run(self, batch: dict[str, Tensor], scale: float) -> Tensor | None:
        """Replay (capturing first when due) for this host-side batch; None: run it eagerly instead."""
        key = self._key(batch)
        previous, self.last_key = self.last_key, key
        if key is None or key in self.failed:
            return None
        if key != self.key:
            if key != previous:  # first sighting of this shape in a row: eager warm-up
                return None
            if not self._capture(key, batch):
                return None
        self._bind_grads()
        for k, t in self.static.items():
            t.copy_(batch[k], non_blocking=True)
        self.scale.fill_(scale)
        self.graph.replay()
        self.replays += 1
        return self.loss

    # ---------------------------------------------------------------------------------------- capture

    def _forward_backward(self) -> Tensor:
        from loratune.kernels import frozen_adapters

        with frozen_adapters(self.model):  # fresh adapter casts, made inside the graph
            with torch.autocast("cuda", dtype=self.compute_dtype or torch.float32,
                                enabled=self.compute_dtype in (torch.bfloat16, torch.float16), cache_enabled=False):
                loss = self.loss_fn(self.model, dict(self.static))
            (loss * self.scale).backward()
        return loss.detach()

    def _bind_grads(self) -> None:
        cleared = [g for p, g in zip(self.params, self.grads) if p.grad is None]
        if cleared:
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
        self.scale = torch.zeros((), dtype=torch.float32, device=dev)
        for p in self.params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        self.grads = [p.grad for p in self.params]
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
            self.failed.add(key)
            torch.cuda.synchronize()
            log.warning("CUDA graph capture failed for micro-batches of shape %s (%s: %s); they run eagerly",
                        key[0], type(e).__name__, str(e).splitlines()[0][:200] if str(e) else "")
            return False
        self.graph, self.key, self.loss = graph, key, loss
        log.info("captured a CUDA graph for micro-batches of shape %s", key[0])
        return True
