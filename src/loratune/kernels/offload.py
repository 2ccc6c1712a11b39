"""Keep the frozen input embedding in host memory: look rows up on the CPU, send only those rows over.

Why: a Llama-3-8B embedding table is 128256 x 4096 bf16 = 1.05 GB of GPU memory (about 13% of the whole
QLoRA footprint at 2 x 2048) for a lookup that touches 4096 rows (33 MB) per step. With LoRA the table
is frozen and gets no gradient, so the table can live in pinned host memory: per step the token ids go
to the host (a few KB), the rows are gathered there straight into a pinned buffer, and one
host-to-device copy (~1.5 ms at 25 GB/s) brings them to the GPU. The swap is skipped when the table is
also the output head (tied embeddings): the head's matmul needs it on the GPU anyway.

The table is held as a plain attribute, not a parameter: `model.parameters()` (hence `model.device`,
the optimizer, `state_dict`) no longer sees it. It is frozen and never part of an adapter checkpoint.
Reference: the original `nn.Embedding` (tests compare the two).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


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

    def forward(self, ids: Tensor) -> Tensor:
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
