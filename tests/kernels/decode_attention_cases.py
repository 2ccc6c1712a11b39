"""Cases of the decode attention kernel against its reference, run under Triton's interpreter on the CPU.

Run as a script with TRITON_INTERPRET=1 set (`tests/kernels/test_decode_attention.py` starts it). Prints one
JSON line per case: the largest difference from the reference and the reference's largest entry.
"""

from __future__ import annotations

import json

import torch

# (rows, heads, kv heads, head dim, window, soft-cap, dtype): Llama's 4 query heads per kv head, one head per kv
# head, a window shorter than the rows (its start inside a block), Gemma 2's soft-cap, fp16
CASES = [(3, 8, 2, 32, None, None, torch.float32), (2, 4, 4, 16, None, None, torch.float32),
         (3, 8, 2, 32, 5, None, torch.float32), (2, 4, 2, 64, 70, 5.0, torch.float32),
         (3, 8, 2, 32, None, None, torch.float16)]


def run_case(rows: int, heads: int, kv_heads: int, dim: int, window: int | None, softcap: float | None,
             dtype: torch.dtype) -> dict:
    from loratune.kernels.decode_attention import reference_decode_attention, triton_decode_attention

    g = torch.Generator().manual_seed(rows * 31 + dim)
    slots_total, capacity = 5, 150
    keys = torch.randn(slots_total, kv_heads, capacity, dim, generator=g).to(dtype)
    values = torch.randn(slots_total, kv_heads, capacity, dim, generator=g).to(dtype)
    # q as a view of a wider [rows, heads + kv heads, dim] tensor (the decode step rotates q and k as one)
    q = torch.randn(rows, heads + kv_heads, dim, generator=g).to(dtype)[:, :heads]
    slots = torch.tensor([4, 0, 2][:rows])
    positions = torch.tensor([130, 3, 64][:rows])  # the first row crosses two key blocks of 64
    kv_len = 140
    kpos = torch.arange(kv_len)[None, :]
    mask = kpos <= positions[:, None]
    if window is not None:
        mask &= (positions[:, None] - kpos) < window
    scale = dim ** -0.5
    ref = reference_decode_attention(q.float(), keys.float(), values.float(), slots, mask[:, None, None, :], scale,
                                     softcap)
    got = triton_decode_attention(q, keys, values, slots, positions, scale, window, softcap).float()
    # the keys split in 4 ranges of 64 (flash-decoding): rows whose keys lie in 1, 2 or 3 of them, empty splits
    split = triton_decode_attention(q, keys, values, slots, positions, scale, window, softcap, splits=4).float()
    return {"case": [rows, heads, kv_heads, dim, window, softcap, str(dtype)], "shape": list(got.shape),
            "err": float((got - ref).abs().max()), "split_err": float((split - ref).abs().max()),
            "scale": float(ref.abs().max())}


if __name__ == "__main__":
    for case in CASES:
        print(json.dumps(run_case(*case)))
