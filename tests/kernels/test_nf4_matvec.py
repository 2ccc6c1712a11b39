"""The NF4 matrix-vector kernel (`loratune.kernels.nf4_matvec`) against its plain-PyTorch reference on the CPU.

The kernel runs under Triton's interpreter (`TRITON_INTERPRET=1`, in a process of its own: see
`nf4_matvec_cases`): the same program the GPU compiles, its arithmetic done by numpy. The reference
dequantizes with bitsandbytes' values (`kernels.nf4`, tested against bitsandbytes) and multiplies. fp32
inputs: the products differ in summation order only (measured within 3e-5 of logits of order 50-100);
fp16 inputs: the kernel rounds the weight values to fp16 as bitsandbytes' dequantization does.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from loratune.kernels.nf4_matvec import nf4_matvec, reference_nf4_matvec


def test_kernel_under_the_interpreter_matches_the_reference() -> None:
    pytest.importorskip("triton")
    script = Path(__file__).with_name("nf4_matvec_cases.py")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    from nf4_matvec_cases import CASES

    assert len(results) == len(CASES)
    for r in results:
        out_f, _, rows, _, _, dtype = r["case"]
        assert r["shape"] == [rows, out_f]
        assert r["scale"] > 5.0  # a real product, not zeros
        tol = 5e-5 if dtype == "torch.float32" else 2e-3
        assert r["err"] < tol * r["scale"], r
        assert r["bare_err"] < tol * r["scale"], r
        assert r["given_xa_err"] == 0.0, r  # the same product, whoever made x A^T


def test_off_cuda_nf4_matvec_is_the_reference() -> None:
    import bitsandbytes.functional as bnbf

    g = torch.Generator().manual_seed(0)
    packed, qs = bnbf.quantize_4bit(torch.randn(24, 128, generator=g), blocksize=64, compress_statistics=True,
                                    quant_type="nf4")
    qs.dtype = torch.float32
    x = torch.randn(2, 128, generator=g)
    lora = (torch.randn(3, 128, generator=g), torch.randn(24, 3, generator=g))
    got = nf4_matvec(x, packed, qs, None, lora)
    want = reference_nf4_matvec(x, packed, qs, None, lora)
    assert got.abs().max() > 1.0
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    # the reference itself: the dequantized weight times x, plus the low-rank term
    from loratune.kernels.nf4 import reference_dequantize_nf4

    dense = reference_dequantize_nf4(packed, qs)
    torch.testing.assert_close(want, x @ dense.T + (x @ lora[0].T) @ lora[1].T, rtol=0, atol=1e-4)
