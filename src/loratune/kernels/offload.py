"""Keep the frozen input embedding in host memory and read only the rows a batch needs.

Why: a Llama-3-8B embedding table is 128256 x 4096 bf16 = 1.05 GB of GPU memory (about 13% of the whole
QLoRA footprint at 2 x 2048) for a lookup that touches 4096 rows (33 MB) per step. With LoRA the table
is frozen and gets no gradient, so it can live in pinned host memory. On CUDA with Triton, a kernel
reads the needed rows straight from the pinned table (the GPU addresses page-locked host memory
directly): no host synchronisation, ~1.5 ms of bus time per step. Elsewhere (or if the driver refuses
the host pointer) the ids go to the host, the rows are gathered there into a pinned buffer and one
host-to-device copy brings them over; that path waits for the GPU once per forward. The swap is
skipped when the table is also the output head (tied embeddings): the head's matmul needs it anyway.

The table is held as a plain attribute, not a parameter: `model.parameters()` (hence `model.device`,
the optimizer, `state_dict`) no longer sees it. It is frozen and never part of an adapter checkpoint.
Reference: the original `nn.Embedding` (tests compare the two).
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import Tensor, nn

log = logging.getLogger(__name__)


class HostEmbedding(nn.Module):
    """A frozen `nn.Embedding` whose table lives in (pinned) host memory; outputs land on `device`."""

    def __init__(self, embedding: nn.Embedding, device: torch.device) -> None:
        super().__init__()
        table = embedding.weight.detach().to("cpu")
        self.table = table.pin_memory() if device.type == "cuda" else table  # plain attribute, not a parameter
        self.padding_idx = embedding.padding_idx
        self.num_embeddings, self.embedding_dim = table.shape
        self.device = device
        self._staging: Tensor | None = None
        self.direct = device.type == "cuda"  # the GPU reads rows from the pinned table itself

    def forward(self, ids: Tensor) -> Tensor:
        if ids.is_cuda and self.direct:
            try:
                from loratune.kernels._offload_triton import gather_rows_from_host

                return gather_rows_from_host(self.table, ids)
            except (ImportError, ValueError, RuntimeError) as e:  # no Triton, or the host pointer refused
                log.info("embedding rows cannot be read from host memory by the GPU (%s); gathering on the host",
                         str(e).splitlines()[0] if str(e) else type(e).__name__)
                self.direct = False
        ids_cpu = ids.to("cpu")  # waits for the GPU work that produced `ids` (and any earlier copy from staging)
        n = ids_cpu.numel()
        if self.device.type != "cuda":
            return F.embedding(ids_cpu, self.table, self.padding_idx).to(self.device)
        if self._staging is None or self._staging.shape[0] < n:
            self._staging = torch.empty(n, self.embedding_dim, dtype=self.table.dtype, pin_memory=True)
        rows = self._staging[:n]
        torch.index_select(self.table, 0, ids_cpu.reshape(-1), out=rows)
        return rows.to(self.device, non_blocking=True).reshape(*ids.shape, self.embedding_dim)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, on host"


def offload_input_embedding(model: nn.Module) -> int:
    """Replace the model's frozen, untied `nn.Embedding` input table by a `HostEmbedding`; returns 1 or 0."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    emb = base.get_input_embeddings()
    head = base.get_output_embeddings()
    if type(emb) is not nn.Embedding or emb.weight.requires_grad or not emb.weight.is_cuda:
        return 0
    if head is not None and getattr(head, "weight", None) is not None and \
            head.weight.data_ptr() == emb.weight.data_ptr():
        return 0
    base.set_input_embeddings(HostEmbedding(emb, emb.weight.device))
    return 1
