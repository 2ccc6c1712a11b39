"""GPU: the decode attention kernel (`loratune.kernels.decode_attention`) against its reference (gathered keys,
masked SDPA) on Llama-3-8B's attention shape (32 heads, 8 kv heads, head size 128) in bf16, 1 and 32 rows at
positions up to 1,500, with a sliding window and with a soft-cap (Gemma 2's head size 256); the cache of 1,600
positions split in 4 ranges of keys (flash-decoding, the default there) and whole.

Run on the GPU machine: `python -m pytest tests/gpu/test_decode_attention_gpu.py -q -m gpu`. Both sides
accumulate in fp32 and round the output to bf16; asserted: within 1e-2 of outputs of order 1.
"""

from __future__ import annotations

import pytest
import torch

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.mark.parametrize("rows", [1, 32])
@pytest.mark.parametrize(("heads", "kv_heads", "dim", "window", "softcap"),
                         [(32, 8, 128, None, None), (32, 8, 128, 300, None), (8, 4, 256, None, 50.0)])
def test_kernel_matches_the_reference(rows, heads, kv_heads, dim, window, softcap) -> None:
    from loratune.kernels.decode_attention import reference_decode_attention, triton_decode_attention

    g = torch.Generator(device="cuda").manual_seed(rows)
    slots_total, capacity = 40, 1600
    keys = torch.randn(slots_total, kv_heads, capacity, dim, generator=g, device="cuda").to(torch.bfloat16)
    values = torch.randn(slots_total, kv_heads, capacity, dim, generator=g, device="cuda").to(torch.bfloat16)
    q = torch.randn(rows, heads, dim, generator=g, device="cuda").to(torch.bfloat16)
    slots = torch.randperm(slots_total, generator=g, device="cuda")[:rows]
    positions = torch.randint(0, 1500, (rows,), generator=g, device="cuda")
    kv_len = 1536
    kpos = torch.arange(kv_len, device="cuda")[None, :]
    mask = kpos <= positions[:, None]
    if window is not None:
        mask &= (positions[:, None] - kpos) < window
    ref = reference_decode_attention(q, keys, values, slots, mask[:, None, None, :], dim ** -0.5, softcap)
    got = triton_decode_attention(q, keys, values, slots, positions, dim ** -0.5, window, softcap)  # 4 key splits
    whole = triton_decode_attention(q, keys, values, slots, positions, dim ** -0.5, window, softcap, splits=1)
    assert got.shape == ref.shape and got.dtype == torch.bfloat16
    assert (got.float() - ref.float()).abs().max() < 1e-2
    assert (whole.float() - ref.float()).abs().max() < 1e-2
