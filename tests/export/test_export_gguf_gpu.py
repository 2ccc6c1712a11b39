"""The Q4_K quantizer of GGUF export on a CUDA GPU: the same bytes as on the CPU, and its speed on an 8B-sized
layer matrix (printed, run with -s: the figure that says how long a q4_K export of a real model takes)."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, quants

from loratune.export.gguf_quant import quantize_q4_k

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def test_q4_k_on_the_gpu_equals_the_cpu_and_its_speed():
    rng = np.random.default_rng(0)
    small = rng.normal(0.0, 0.02, (256, 4096)).astype(np.float32)
    on_gpu = quantize_q4_k(small, device="cuda")
    on_cpu = quantize_q4_k(small, device="cpu")
    # the same blocks; a scale may differ in its last bit where fp32 division rounds differently on the GPU
    same = float((on_gpu == on_cpu).mean())
    assert same > 0.999
    back = quants.dequantize(on_gpu, GGMLQuantizationType.Q4_K)
    assert float(np.sqrt(((back - small) ** 2).mean()) / small.std()) < 0.09
    big = rng.normal(0.0, 0.02, (14336, 4096)).astype(np.float32)  # Llama-3-8B's MLP matrix
    torch.cuda.synchronize()
    start = time.perf_counter()
    quantize_q4_k(big)
    torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    print(f"\nQ4_K of a 14336 x 4096 matrix on the GPU: {seconds:.2f} s ({big.size / seconds / 1e6:.0f} M values/s; "
          f"an 8B model about {8e9 / (big.size / seconds) / 60:.1f} min)")
