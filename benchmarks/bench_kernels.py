"""Per-kernel timings on the GPU: device time (CUDA events) and host time per call, fused vs plain.

Why: at 8B and 2 x 2048 the fused path was host-bound (run 2: ~410 ms of kernels in a ~590 ms step), so
each candidate is measured for both what it costs the GPU and what it costs the Python thread that
launches it. Host time = wall time of N calls issued back to back while the GPU is kept busy by a
long matmul queued first (so launches never wait on the device), divided by N.

Usage (GPU machine): python benchmarks/bench_kernels.py  -> prints a table.
"""

from __future__ import annotations

import functools
import statistics
import time

import torch


def device_ms(fn, reps: int = 20) -> float:
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        fn()
        e.record()
        e.synchronize()
        times.append(s.elapsed_time(e))
    return statistics.median(times)


def host_us(fn, calls: int = 200) -> float:
    fn()
    torch.cuda.synchronize()
    big = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    for _ in range(6):  # ~10 ms of queued GPU work: the launches below never wait for the device
        big @ big
    t = time.perf_counter()
    for _ in range(calls):
        fn()
    dt = time.perf_counter() - t
    torch.cuda.synchronize()
    return dt / calls * 1e6


def main() -> None:
    import bitsandbytes.functional as bnbf
    from liger_kernel.ops.rms_norm import LigerRMSNormFunction

    from loratune.kernels import _nf4_triton as nt
    from loratune.kernels.lora_linear import lora_linear

    torch.manual_seed(0)
    rows = []
    out_f, in_f, t = 14336, 4096, 4096
    w = (0.02 * torch.randn(out_f, in_f, device="cuda")).to(torch.bfloat16)
    packed, qs = bnbf.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4",
                                    quant_storage=torch.uint8)
    args = nt.kernel_args(packed, qs)
    rows.append(("bnb dequantize_4bit 14336x4096", device_ms(lambda: bnbf.dequantize_4bit(packed, qs)),
                 host_us(lambda: bnbf.dequantize_4bit(packed, qs))))
    for direct in (False, True):
        fn = functools.partial(nt.dequantize_nf4_triton, packed, qs, torch.bfloat16, args=args, direct=direct)
        rows.append((f"triton dequant 14336x4096 ({'direct' if direct else 'JIT'} launch)", device_ms(fn), host_us(fn)))
    ref = bnbf.dequantize_4bit(packed, qs)
    for direct in (False, True):
        got = nt.dequantize_nf4_triton(packed, qs, torch.bfloat16, args=args, direct=direct)
        print(f"triton dequant ({'direct' if direct else 'JIT'}) equals bnb: {torch.equal(got, ref)}, "
              f"max diff {(got.float() - ref.float()).abs().max().item():.3g}")
    small_w = (0.02 * torch.randn(64, 64, device="cuda")).to(torch.bfloat16)
    sp, sqs = bnbf.quantize_4bit(small_w, blocksize=64, compress_statistics=True, quant_type="nf4",
                                 quant_storage=torch.uint8)
    sargs = nt.kernel_args(sp, sqs)
    for direct in (False, True):
        fn = functools.partial(nt.dequantize_nf4_triton, sp, sqs, torch.bfloat16, args=sargs, direct=direct)
        rows.append((f"triton dequant 64x64 ({'direct' if direct else 'JIT'} launch)", device_ms(fn), host_us(fn)))
    rows.append(("bnb dequantize_4bit 64x64", device_ms(lambda: bnbf.dequantize_4bit(sp, sqs)),
                 host_us(lambda: bnbf.dequantize_4bit(sp, sqs))))
    a = torch.randn(64, 64, device="cuda", dtype=torch.bfloat16)
    rows.append(("torch.add 64x64 (aten launch cost)", device_ms(lambda: a + a), host_us(lambda: a + a)))
    x = torch.randn(t, in_f, device="cuda", dtype=torch.bfloat16)
    nw = torch.ones(in_f, device="cuda", dtype=torch.bfloat16)
    rows.append(("liger rmsnorm fwd 4096x4096", device_ms(lambda: LigerRMSNormFunction.apply(x, nw, 1e-5, 0.0,
                                                                                              "llama", False)),
                 host_us(lambda: LigerRMSNormFunction.apply(x, nw, 1e-5, 0.0, "llama", False))))

    def hf_rms():
        h = x.float()
        return nw * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-5)).to(x.dtype)

    rows.append(("HF rmsnorm fwd 4096x4096", device_ms(hf_rms), host_us(hf_rms)))

    # one LoRA linear layer (gate_proj shape), forward + backward, fused vs peft-style under autocast
    xa = torch.randn(t, in_f, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    la = (0.01 * torch.randn(16, in_f, device="cuda")).requires_grad_(True)
    lb = (0.01 * torch.randn(out_f, 16, device="cuda")).requires_grad_(True)
    g = torch.randn(t, out_f, device="cuda", dtype=torch.bfloat16)

    def fused():
        y = lora_linear(xa, lambda dt: nt.dequantize_nf4_triton(packed, qs, dt, args=args), None, la, lb, 2.0)
        y.backward(g)

    def plain():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            wd = bnbf.dequantize_4bit(packed, qs)
            y = torch.nn.functional.linear(xa, wd)
            y = y.clone() + torch.nn.functional.linear(torch.nn.functional.linear(xa, la), lb) * 2.0
        y.backward(g)

    rows.append(("LoRA gate_proj fwd+bwd fused", device_ms(fused, 10), host_us(fused, 20)))
    rows.append(("LoRA gate_proj fwd+bwd bnb+peft-style", device_ms(plain, 10), host_us(plain, 20)))
    flops = 3 * 2 * t * in_f * out_f
    print(f"\nmatmul floor for gate_proj fwd+bwd (3 GEMMs at 790 TFLOP/s): {flops / 790e12 * 1e3:.3f} ms")
    print("\n| what | device ms | host us per call |\n|---|---|---|")
    for name, d, h in rows:
        print(f"| {name} | {d:.3f} | {h:.1f} |")


if __name__ == "__main__":
    main()
