"""The decode attention kernel (`loratune.kernels.decode_attention`) against its plain-PyTorch reference on the CPU.

The kernel runs under Triton's interpreter (`TRITON_INTERPRET=1`, in a process of its own: see
`decode_attention_cases`). The reference gathers each row's keys and runs masked SDPA (or, with a soft-cap,
the product path); the kernel reads the cache in place with an online softmax, whole or in splits of the keys
combined by a second kernel. fp32: within 1e-6 of outputs
of order 1-3 (measured 5e-7); fp16: within 2e-3 (measured 9e-4).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from loratune.kernels.decode_attention import decode_attention, reference_decode_attention


def test_kernel_under_the_interpreter_matches_the_reference() -> None:
    pytest.importorskip("triton")
    script = Path(__file__).with_name("decode_attention_cases.py")
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "TRITON_INTERPRET": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    from decode_attention_cases import CASES

    assert len(results) == len(CASES)
    for r in results:
        rows, heads, _, dim, _, _, dtype = r["case"]
        assert r["shape"] == [rows, heads, dim]
        assert r["scale"] > 1.0
        tol = (1e-6 if dtype == "torch.float32" else 2e-3) * r["scale"]
        assert r["err"] < tol and r["split_err"] < tol, r


def test_key_splits_follow_the_capacity() -> None:
    from loratune.kernels.decode_attention import key_splits

    assert key_splits(300) == (1, 320) and key_splits(512) == (1, 512)
    assert key_splits(1000) == (2, 512) and key_splits(1256) == (4, 320) and key_splits(8192) == (16, 512)
    assert key_splits(100_000) == (16, 6272)


def test_the_reference_is_per_row_attention_over_the_cache() -> None:
    """Off CUDA `decode_attention` is the reference, which equals each row attended alone over its own slot."""
    g = torch.Generator().manual_seed(0)
    keys, values = torch.randn(3, 2, 20, 8, generator=g), torch.randn(3, 2, 20, 8, generator=g)
    q = torch.randn(2, 4, 8, generator=g)
    slots, positions = torch.tensor([2, 0]), torch.tensor([9, 4])
    mask = (torch.arange(12)[None, :] <= positions[:, None])[:, None, None, :]
    got = decode_attention(q, keys, values, slots, positions, 0.3, None, None, mask)
    assert got.shape == (2, 4, 8)
    for b in range(2):
        s, p = int(slots[b]), int(positions[b])
        k = keys[s, :, :p + 1].repeat_interleave(2, dim=0)  # query head h reads kv head h // 2
        v = values[s, :, :p + 1].repeat_interleave(2, dim=0)
        w = torch.softmax(0.3 * torch.einsum("hd,hkd->hk", q[b], k), dim=-1)
        torch.testing.assert_close(got[b], torch.einsum("hk,hkd->hd", w, v), rtol=0, atol=1e-6)
    assert torch.equal(got, reference_decode_attention(q, keys, values, slots, mask, 0.3, None))
    with pytest.raises(ValueError, match="needs the key mask"):
        decode_attention(q, keys, values, slots, positions, 0.3, None, None)
