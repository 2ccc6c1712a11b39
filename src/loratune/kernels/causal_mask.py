"""Keep a captured CUDA graph on SDPA's causal fast path instead of an explicit 4-D mask.

Why: for an unpadded batch transformers skips building the causal mask and calls SDPA with
`is_causal=True`, which dispatches to the flash/cuDNN kernels that skip the masked half of the work.
Some transformers releases (5.17 among them) refuse that skip whenever a CUDA stream is capturing, even
when there is no padding mask at all: a graph captured by `loratune.kernels.graphs` then holds a
materialised (batch, 1, seq, seq) boolean mask and SDPA's masked kernels. Measured on the H100 (run 10,
Llama-3-8B shape, 2 x 2048): cuDNN attention took 55 ms per step in the graph against 17 ms eagerly.

How, through transformers' public extension points and for one model instance only:
`causal_mask_skip(model)` registers an attention implementation named `loratune_sdpa` (the same
`sdpa_attention_forward`, and as its mask builder `causal_skip_mask`, which returns None exactly where
transformers itself would skip the mask outside a capture, and otherwise builds `sdpa_mask`'s mask), and
switches the model's configs from `sdpa` to it for the duration of the context. The graph captured inside
keeps SDPA's causal kernels; the model is back on `sdpa` afterwards, so nothing else changes.
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


def register() -> None:
    """Make `NAME` a known attention implementation (idempotent): SDPA's forward, `causal_skip_mask` as mask."""
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, AttentionInterface

    if NAME not in ALL_ATTENTION_FUNCTIONS:
        AttentionInterface.register(NAME, ALL_ATTENTION_FUNCTIONS["sdpa"])
    if NAME not in ALL_MASK_ATTENTION_FUNCTIONS:
        AttentionMaskInterface.register(NAME, causal_skip_mask)


def _sdpa_configs(model: nn.Module) -> list:
    """Every distinct config object of the model's modules whose attention implementation is `sdpa`."""
    seen: dict[int, object] = {}
    for m in model.modules():
        cfg = getattr(m, "config", None)
        if cfg is not None and getattr(cfg, "_attn_implementation", None) == "sdpa":
            seen.setdefault(id(cfg), cfg)
    return list(seen.values())


@contextlib.contextmanager
def causal_mask_skip(model: nn.Module) -> Iterator[int]:
    """Inside: the model's SDPA attention uses `NAME` (see the module docstring); yields how many configs
    were switched (0: the model does not use SDPA, nothing changes). Restored on exit, also after an error."""
    configs = _sdpa_configs(model)
    if configs:
        register()
    try:
        for cfg in configs:  # the dict form sets this config only; each sdpa sub-config is in `configs` itself
            cfg._attn_implementation = {"": NAME}
        yield len(configs)
    finally:
        for cfg in configs:
            cfg._attn_implementation = {"": "sdpa"}
