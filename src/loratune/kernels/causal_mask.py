"""Keep SDPA on its causal fast path for unpadded batches: no explicit mask, no mask check on the GPU.

Why: for an unpadded batch transformers skips building the causal mask and calls SDPA with
`is_causal=True` (the flash/cuDNN kernels that skip the masked half of the work). To know that it may skip,
it inspects tensors: an all-ones attention mask, or, without one, the position ids (to rule out packed
sequences). Each inspection is a host/GPU synchronisation in an eager step, and inside a CUDA graph
capture, where reading a tensor is impossible, transformers (5.17 among others) gives up the skip and
materialises a (batch, 1, seq, seq) mask: a captured micro-batch then runs SDPA's masked kernels, which are
several times slower (docs/benchmarks.md, "Figures behind the source's design notes").

The caller knows on the host whether a batch is padded or packed. Through transformers' public extension
points, for one model instance and only inside `causal_mask_skip(model, unpadded=...)`, the model's SDPA
attention is switched to a registered twin of `sdpa` whose mask builder decides without reading tensors:
- `loratune_sdpa` (`causal_skip_mask`): no mask exactly where transformers itself would skip it with no
  padding mask;
- `loratune_sdpa_unpadded` (`unpadded_causal_mask`): the caller promises that every attention mask seen in the
  context keeps all positions, so a 2-D mask adds nothing and is treated as absent.
Everything else (packed sequences, sliding windows narrower than the sequence, custom mask functions,
caches) gets transformers' own `sdpa_mask`. The model is back on `sdpa` when the context ends.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

from torch import Tensor, nn

NAME = "loratune_sdpa"


def causal_skip_mask(batch_size: int, q_length: int, kv_length: int, q_offset: int = 0, kv_offset: int = 0,
                     mask_function: Callable | None = None, attention_mask: Tensor | None = None,
                     local_size: int | None = None, allow_is_causal_skip: bool = True, **kwargs) -> Tensor | None:
    """transformers' `sdpa_mask`, but None (SDPA's `is_causal`) for a plain causal mask without padding.

    The skip conditions are transformers' own (`masking_utils._ignore_causal_mask_sdpa` with no padding mask):
    the caller allows the skip (it does not for packed sequences or custom mask functions), no window is
    narrower than the keys, and the queries are either one token, as long as the keys, or start at offset 0.
    It never reads a tensor's values, so it is safe inside a capture.
    """
    from transformers.masking_utils import causal_mask_function, sdpa_mask

    if (allow_is_causal_skip and attention_mask is None and isinstance(q_offset, int)
            and (local_size is None or kv_length < local_size)
            and (q_length == 1 or kv_length == q_length or q_offset == 0)):
        return None
    return sdpa_mask(batch_size, q_length, kv_length, q_offset=q_offset, kv_offset=kv_offset,
                     mask_function=mask_function or causal_mask_function, attention_mask=attention_mask,
                     local_size=local_size, allow_is_causal_skip=allow_is_causal_skip, **kwargs)


def unpadded_causal_mask(batch_size: int, q_length: int, kv_length: int, q_offset: int = 0, kv_offset: int = 0,
                         mask_function: Callable | None = None, attention_mask: Tensor | None = None,
                         **kwargs) -> Tensor | None:
    """`causal_skip_mask` for a caller that promises `attention_mask` (when given) keeps every position."""
    return causal_skip_mask(batch_size, q_length, kv_length, q_offset, kv_offset, mask_function, None, **kwargs)


NAME_UNPADDED = "loratune_sdpa_unpadded"
BUILDERS = {NAME: causal_skip_mask, NAME_UNPADDED: unpadded_causal_mask}


def register() -> None:
    """Make `NAME` and `NAME_UNPADDED` known attention implementations (idempotent): SDPA's own forward, with
    `BUILDERS` as their mask builders."""
    from transformers.masking_utils import (
        ALL_MASK_ATTENTION_FUNCTIONS,
        AttentionMaskInterface,
    )
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, AttentionInterface

    for name, builder in BUILDERS.items():
        if name not in ALL_ATTENTION_FUNCTIONS:
            AttentionInterface.register(name, ALL_ATTENTION_FUNCTIONS["sdpa"])
        if name not in ALL_MASK_ATTENTION_FUNCTIONS:
            AttentionMaskInterface.register(name, builder)


def _sdpa_configs(model: nn.Module) -> list:
    """Every distinct config object of the model's modules whose attention implementation is `sdpa` (found once
    per model and kept on it: the loop asks for every micro-batch)."""
    found = getattr(model, "_loratune_sdpa_configs", None)
    if found is None:
        seen: dict[int, object] = {}
        for m in model.modules():
            cfg = getattr(m, "config", None)
            if cfg is not None and getattr(cfg, "_attn_implementation", None) == "sdpa":
                seen.setdefault(id(cfg), cfg)
        found = list(seen.values())
        model._loratune_sdpa_configs = found
    return found


@contextlib.contextmanager
def causal_mask_skip(model: nn.Module, unpadded: bool = False) -> Iterator[int]:
    """Inside: the model's SDPA attention decides its causal mask on the host (see the module docstring);
    `unpadded`: every attention mask passed inside keeps all positions (the caller checked on the host).
    Yields how many configs were switched (0: the model does not use SDPA; nothing changes). Restored on exit,
    also after an error."""
    configs = [c for c in _sdpa_configs(model) if c._attn_implementation == "sdpa"]
    if configs:
        register()
    name = NAME_UNPADDED if unpadded else NAME
    try:
        for cfg in configs:  # the dict form sets this config only; each sdpa sub-config is in `configs` itself
            cfg._attn_implementation = {"": name}
        yield len(configs)
    finally:
        for cfg in configs:
            cfg._attn_implementation = {"": "sdpa"}


def is_unpadded(batch: dict[str, Tensor]) -> bool:
    """Whether a host-side batch may run under `causal_mask_skip(model, unpadded=True)`: it has an attention mask
    that keeps every position, and it is not packed (packed batches carry position_ids and no mask)."""
    mask = batch.get("attention_mask")
    return mask is not None and "position_ids" not in batch and not mask.is_cuda and bool(mask.all())


def causal_mask_for(model: nn.Module, batch: dict[str, Tensor]) -> contextlib.AbstractContextManager:
    """The context to run `model` on this host-side batch in: `causal_mask_skip(unpadded=True)` for an unpadded
    batch (`is_unpadded`), else nothing (transformers builds the mask the batch needs)."""
    return causal_mask_skip(model, unpadded=True) if is_unpadded(batch) else contextlib.nullcontext()
