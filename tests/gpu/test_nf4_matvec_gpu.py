"""GPU: the NF4 matrix-vector kernel (`loratune.kernels.nf4_matvec`) against bitsandbytes' own dequantization
followed by a matrix product, on Llama-3-8B's layer shapes at 1, 8 and 32 rows, with and without LoRA.

Run on the GPU machine: `python -m pytest tests/gpu/test_nf4_matvec_gpu.py -q -m gpu`. Skipped without CUDA.
Both sides round every weight value to bf16 and accumulate in fp32 (bitsandbytes' product: cuBLAS), so they
differ in summation order only; asserted: relative error (Frobenius) under 2e-3 (bf16 output rounding is 4e-3
per entry, its norm-relative effect smaller).
"""

from __future__ import annotations

import pytest
import torch

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

SHAPES = [(4096, 4096), (14336, 4096), (4096, 14336), (1024, 4096)]  # (out, in): q/o, gate/up, down, k/v


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("rows", [1, 8, 32])
@pytest.mark.parametrize("with_lora", [False, True])
def test_matvec_matches_bitsandbytes(shape, rows, with_lora) -> None:
    import bitsandbytes.functional as bnbf

    from loratune.kernels.nf4_matvec import fits_kernel, nf4_matvec

    out_f, in_f = shape
    g = torch.Generator(device="cuda").manual_seed(rows + out_f)
    w = (0.02 * torch.randn(out_f, in_f, generator=g, device="cuda")).to(torch.bfloat16)
    packed, qs = bnbf.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4",
                                    quant_storage=torch.uint8)
    x = torch.randn(rows, in_f, generator=g, device="cuda").to(torch.bfloat16)
    lora = None
    if with_lora:
        lora = ((0.02 * torch.randn(16, in_f, generator=g, device="cuda")).to(torch.bfloat16),
                (0.1 * torch.randn(out_f, 16, generator=g, device="cuda")).to(torch.bfloat16))
    assert fits_kernel(x, qs)
    got = nf4_matvec(x, packed, qs, None, lora)
    dense = bnbf.dequantize_4bit(packed, qs).to(torch.bfloat16)
    want = x.float() @ dense.float().T
    if lora is not None:
        want = want + (x.float() @ lora[0].float().T) @ lora[1].float().T
    assert got.shape == (rows, out_f) and got.dtype == torch.bfloat16
    assert want.abs().max() > 0.1
    assert _rel(got.float(), want) < 2e-3
    # the same answer on every call (no atomics): a replayed graph and an eager step agree
    assert torch.equal(got, nf4_matvec(x, packed, qs, None, lora))


def test_matvec_timing_print() -> None:
    """Not an assertion on time: prints the kernel's time and bandwidth beside dequantize + matmul."""
    import bitsandbytes.functional as bnbf

    from loratune.kernels._nf4_triton import kernel_args
    from loratune.kernels.nf4 import dequantize_nf4
    from loratune.kernels.nf4_matvec import nf4_matvec

    for out_f, in_f in SHAPES:
        w = (0.02 * torch.randn(out_f, in_f, device="cuda")).to(torch.bfloat16)
        packed, qs = bnbf.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4",
                                        quant_storage=torch.uint8)
        args = kernel_args(packed, qs)
        for rows in (1, 32):
            x = torch.randn(rows, in_f, device="cuda").to(torch.bfloat16)
            times = []
            for fn in (lambda: nf4_matvec(x, packed, qs, None, None, args),
                       lambda: x @ dequantize_nf4(packed, qs, torch.bfloat16).T):
                for _ in range(3):
                    fn()
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                for _ in range(50):
                    fn()
                end.record()
                torch.cuda.synchronize()
                times.append(start.elapsed_time(end) / 50 * 1e3)
            gbs = out_f * in_f * 0.5625 / (times[0] * 1e-6) / 1e9
            print(f"nf4 matvec {out_f}x{in_f} rows {rows}: kernel {times[0]:.1f} us ({gbs:.0f} GB/s of 4-bit "
                  f"weight), dequantize+matmul {times[1]:.1f} us")
            assert times[0] > 0
