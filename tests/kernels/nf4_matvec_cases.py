"""Cases of the NF4 matrix-vector kernel against its reference, run under Triton's interpreter on the CPU.

Run as a script with TRITON_INTERPRET=1 set (the interpreter is chosen when the kernel is defined, so it
needs a process of its own: `tests/kernels/test_nf4_matvec.py` starts one). Prints one JSON line per case:
the largest difference from the reference and the reference's largest entry.
"""

from __future__ import annotations

import json

import torch

# (out, in, rows, double-quantized, quant type, x dtype): rows 1 (the fp32 sum path) and more (tl.dot), a split
# reduction (in=2048: 4 splits), columns that do not fill a block (out=40), fp16 inputs
CASES = [(96, 512, 1, True, "nf4", torch.float32), (96, 512, 3, False, "nf4", torch.float32),
         (40, 320, 17, True, "nf4", torch.float32), (64, 2048, 1, True, "nf4", torch.float32),
         (64, 2048, 5, True, "fp4", torch.float32), (48, 256, 8, True, "nf4", torch.float16)]


def run_case(out_f: int, in_f: int, rows: int, nested: bool, quant_type: str, dtype: torch.dtype) -> dict:
    import bitsandbytes.functional as bnbf

    from loratune.kernels.nf4_matvec import _triton_matvec, reference_nf4_matvec

    g = torch.Generator().manual_seed(out_f * 7 + rows)
    w = torch.randn(out_f, in_f, generator=g)
    packed, qs = bnbf.quantize_4bit(w, blocksize=64, compress_statistics=nested, quant_type=quant_type)
    qs.dtype = dtype
    x = torch.randn(rows, in_f, generator=g).to(dtype)
    bias = torch.randn(out_f, generator=g).to(dtype)
    lora = ((0.1 * torch.randn(4, in_f, generator=g)).to(dtype), torch.randn(out_f, 4, generator=g).to(dtype))
    ref = reference_nf4_matvec(x.float(), packed, qs, bias.float(), (lora[0].float(), lora[1].float()))
    got = _triton_matvec(x, packed, qs, bias, lora, None).float()
    bare = _triton_matvec(x, packed, qs, None, None, None).float()
    bare_ref = reference_nf4_matvec(x.float(), packed, qs)
    # x A^T given by the caller as a column slice of a wider product (layers sharing x stack their A matrices)
    wide = torch.cat([torch.randn(rows, 3, generator=g).to(dtype), torch.nn.functional.linear(x, lora[0])], dim=1)
    given = _triton_matvec(x, packed, qs, bias, lora, None, wide[:, 3:]).float()
    return {"case": [out_f, in_f, rows, nested, quant_type, str(dtype)], "shape": list(got.shape),
            "err": float((got - ref).abs().max()), "bare_err": float((bare - bare_ref).abs().max()),
            "given_xa_err": float((given - got).abs().max()),
            "scale": float(ref.abs().max())}


if __name__ == "__main__":
    for case in CASES:
        print(json.dumps(run_case(*case)))
