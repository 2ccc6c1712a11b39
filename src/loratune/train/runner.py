"""One micro-batch's summed loss on the model being trained: one interface, whatever the model code.

The loop (`loratune.train.loop`) and the benchmarks call a runner and never look inside the model:

    runner.module               the nn.Module that trains (train()/eval())
    runner.loss_sum(batch)      (summed token loss on the device, supervised tokens) of a host-side batch
                                as `loratune.data.collate` makes it (a padding-free stream or padded rows)
    runner.frozen_adapters()    one optimizer step's passes: the adapters' compute-dtype casts made once
    runner.accumulating(last)   the context of one micro-batch's backward (gradient sync on the last only)
    runner.graphs               CUDA graph replay of repeated micro-batch shapes, or None (eager)
    runner.head_inputs(batch)   (final hidden states [N, H] of every position, head weight, logit softcap): for
                                objectives that need more than the token loss sum (`loratune.pref`)
    runner.adapters_disabled()  the base model alone while inside (the reference policy of preference training)

`DecoderRunner` runs loratune's decoder: the batch's `position_ids` give the sample boundaries of a stream
(padded rows are samples of the row's length, their padding after each sample's end seen by none of its
tokens); the decoder computes in its own compute dtype, so there is no autocast; its fixed-shape streams
(CUDA) replay as CUDA graphs where the run resolved graphs on (`decoder_graphs`). `HFRunner` runs the
transformers (+ peft) model as accelerate prepared it and as the libraries ship it: autocast, the model's own
attention and masks, peft's forwards, eagerly (no graphs; nothing of ours inside the model: the loss reads
only its final hidden states and the head's weight, `loratune.train.loss.lm_loss_sum`).
Both move the batch to the device from pinned memory without blocking, with the supervised rows counted
on the host (`with_target_rows`), so the host does not wait for the GPU inside a step. A decoder whose input
embedding is in host memory (`model.embedding_on_host`) gets its rows gathered on the batch's host ids before
the batch moves (`host_embeds`), eagerly and as a graphed micro-batch's static input.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Protocol

import torch
from accelerate import Accelerator
from torch import Tensor, nn

from loratune.data.collate import segment_lengths
from loratune.decoder.attention import Boundaries
from loratune.decoder.lora import adapters_disabled
from loratune.decoder.model import Decoder
from loratune.kernels.graphs import GraphedMicroBatch
from loratune.kernels.loss import fused_linear_cross_entropy_sum
from loratune.train.loss import (
    TARGET_ROWS,
    decoder_loss_sum,
    hidden_states,
    lm_loss_sum,
    shift_labels,
    unwrap_model,
    with_target_rows,
)

Batch = dict[str, Tensor]


class Runner(Protocol):
    module: nn.Module
    graphs: GraphedMicroBatch | None

    def loss_sum(self, batch: Batch) -> tuple[Tensor, int]: ...

    def frozen_adapters(self) -> contextlib.AbstractContextManager: ...

    def accumulating(self, last: bool) -> contextlib.AbstractContextManager: ...


def to_device(batch: Batch, device: torch.device) -> Batch:
    """Host tensors to `device`: through pinned memory without blocking on CUDA, as they are on CPU."""
    cuda = device.type == "cuda"
    return {k: (v.pin_memory() if cuda else v).to(device, non_blocking=cuda) for k, v in batch.items()}


EMBEDS = "inputs_embeds"  # a batch's embedded ids, made on the host ids (an input embedding in host memory)


def host_embeds(decoder: Decoder, batch: Batch) -> Batch:
    """{EMBEDS: the rows of the batch's host-side ids on the device} where the decoder's input embedding is in host
    memory (`TokenEmbedding.to_host`: gathered on the host, copied without blocking), else {}."""
    if not decoder.embed.on_host:
        return {}
    return {EMBEDS: decoder.embed(batch["input_ids"].reshape(-1))}


def decoder_stream_loss_sum(decoder: Decoder, batch: Batch) -> Tensor:
    """The summed token loss of a padding-free stream with nothing read back to the host (what a CUDA graph of
    the decoder captures): the boundaries from the position ids on the device, every row through the head
    (unsupervised rows add 0), the token count left to the caller."""
    b = Boundaries.on_device(batch["position_ids"])
    hidden = decoder.hidden_states(batch["input_ids"].reshape(-1), b, inputs_embeds=batch.get(EMBEDS))
    targets = shift_labels(batch["labels"]).reshape(-1)
    loss, _ = fused_linear_cross_entropy_sum(hidden, decoder.head.weight, targets, softcap=decoder.head.softcap,
                                             triton=decoder.kernels)
    return loss


def decoder_graphs(decoder: Decoder) -> GraphedMicroBatch | None:
    """CUDA graph replay of the decoder's fixed-shape streams (`Resolved.pad_streams`), None where unavailable
    (no CUDA, or the decoder's attention or residual dropout; adapter dropout is replayed, its masks reseeded per
    micro-batch: `loratune.train.dropout_seeds`)."""
    if decoder.config.attention_dropout or decoder.config.residual_dropout:
        return None
    graphs = GraphedMicroBatch(decoder, decoder_stream_loss_sum, inputs=lambda batch: host_embeds(decoder, batch))
    return graphs if graphs.enabled else None


class DecoderRunner:
    """loratune's decoder on padding-free streams or padded rows; `graphs`: replay of its fixed-shape streams
    (`decoder_graphs`), or None."""

    def __init__(self, decoder: Decoder, device: torch.device, graphs: GraphedMicroBatch | None = None) -> None:
        self.module, self.device, self.graphs = decoder, torch.device(device), graphs
        self._last: tuple[Tensor, Boundaries] | None = None  # (position ids, their boundaries): see `boundaries`

    def boundaries(self, batch: Batch) -> Boundaries:
        """The samples of a host-side batch: a stream's segments, or one sample per padded row.

        The boundaries of the last stream are kept (with the masks the decoder built on them) for another pass over
        the same position ids: a preference method's reference pass reuses its policy pass's."""
        ids = batch["input_ids"]
        if "position_ids" in batch:
            pos = batch["position_ids"]
            if self._last is None or self._last[0] is not pos:
                self._last = (pos, Boundaries.from_lengths(segment_lengths(pos), self.device))
            return self._last[1]
        return Boundaries.from_lengths([ids.shape[-1]] * (ids.shape[0] if ids.dim() == 2 else 1), self.device)

    def loss_sum(self, batch: Batch) -> tuple[Tensor, int]:
        b = self.boundaries(batch)
        embeds = host_embeds(self.module, batch).get(EMBEDS)  # from the host ids, before they move
        moved = to_device(batch if TARGET_ROWS in batch else with_target_rows(batch), self.device)
        return decoder_loss_sum(self.module, moved["input_ids"], b, moved["labels"], moved[TARGET_ROWS],
                                inputs_embeds=embeds)

    def frozen_adapters(self) -> contextlib.AbstractContextManager:
        return self.module.frozen_adapters()

    def head_inputs(self, batch: Batch) -> tuple[Tensor, Tensor, float | None]:
        embeds = host_embeds(self.module, batch).get(EMBEDS)
        ids = batch["input_ids"].to(self.device, non_blocking=self.device.type == "cuda")
        hidden = self.module.hidden_states(ids.reshape(-1), self.boundaries(batch), inputs_embeds=embeds)
        return hidden, self.module.head.weight, self.module.head.softcap

    def adapters_disabled(self) -> contextlib.AbstractContextManager:
        return adapters_disabled(self.module)

    def accumulating(self, last: bool) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()  # one process: nothing to synchronise


class HFRunner:
    """The transformers (+ peft) model as accelerate prepared it, run as the libraries ship it (eagerly: `graphs`
    is always None)."""

    graphs: GraphedMicroBatch | None = None

    def __init__(self, model: nn.Module, accelerator: Accelerator,
                 loss_fn: Callable[[nn.Module, Batch], tuple[Tensor, int]] = lm_loss_sum) -> None:
        self.module, self.acc, self.loss_fn = model, accelerator, loss_fn

    def loss_sum(self, batch: Batch) -> tuple[Tensor, int]:
        moved = to_device(batch if TARGET_ROWS in batch else with_target_rows(batch), self.acc.device)
        with self.acc.autocast():
            return self.loss_fn(self.module, moved)

    def frozen_adapters(self) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()  # peft casts its adapters itself, in every pass

    def head_inputs(self, batch: Batch) -> tuple[Tensor, Tensor, float | None]:
        moved = to_device({k: v for k, v in batch.items() if k != "labels"}, self.acc.device)
        with self.acc.autocast():
            hidden = hidden_states(self.module, moved)
        base = unwrap_model(self.module)
        return (hidden.reshape(-1, hidden.shape[-1]), base.get_output_embeddings().weight,
                getattr(base.config, "final_logit_softcapping", None))

    def adapters_disabled(self) -> contextlib.AbstractContextManager:
        model = self.module
        while not hasattr(model, "disable_adapter") and isinstance(getattr(model, "module", None), nn.Module):
            model = model.module  # accelerate's wrappers
        if not hasattr(model, "disable_adapter"):
            raise TypeError("the model has no adapters to disable (adapter.type none): no reference policy")
        return model.disable_adapter()  # peft's context: the base model alone

    def accumulating(self, last: bool) -> contextlib.AbstractContextManager:
        # gradients are all-reduced once per window, on its last backward (no-op on one process)
        return contextlib.nullcontext() if last else self.acc.no_sync(self.module)
