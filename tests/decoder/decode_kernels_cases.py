"""The decode step with its Triton kernels (NF4 matvec + LoRA, decode attention) under Triton's interpreter, against
the cache's general path, on a tiny NF4 Llama with LoRA (fp32).

Run as a script with TRITON_INTERPRET=1 (`test_decode_step.py` starts it): the kernels are taken on the CPU by
pointing the step's kernel checks at the interpreter (CUDA is what they check for otherwise). Prints one JSON
line: the largest logit difference per step and whether the greedy tokens agree.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parents[2] / "benchmarks"))


def main() -> dict:
    from bench_decode import build_models

    from loratune.decoder import decode_graphs, decode_step
    from loratune.decoder.generate import SlotDecoder
    from loratune.kernels import decode_attention, nf4_matvec

    _, dec = build_models("tiny", "cpu", dtype=torch.float32, rank=4, seed=5)
    taken = {"matvec": 0, "attention": 0}
    triton_matvec = nf4_matvec._triton_matvec

    def matvec(*args, **kwargs):
        taken["matvec"] += 1
        return triton_matvec(*args, **kwargs)

    triton_attention = decode_attention.triton_decode_attention

    def attention(*args, **kwargs):
        taken["attention"] += 1
        return triton_attention(*args, **kwargs)

    nf4_matvec._triton_matvec = matvec
    decode_attention.triton_decode_attention = attention
    decode_step.fits_kernel = nf4_matvec.fits_kernel = lambda x, qs: x.dim() == 2 and x.shape[0] <= nf4_matvec.MAX_ROWS
    decode_step.fits_kernel_attention = decode_attention.fits_kernel = lambda device, head_dim: True
    assert decode_graphs.attention_kernel is decode_step.attention_kernel
    sd = SlotDecoder(dec, 4, 600, graphs=False)  # 600 positions: the attention splits the keys in 2 (one empty)
    assert sd.runner.kernel_attention
    ref = dec.new_cache(4, 600)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 512, (n,), generator=g).tolist() for n in (9, 4, 14)]
    slots = [3, 0, 1]
    errors, agree = [], True
    with torch.inference_mode():
        tokens = sd.prefill(slots, prompts).argmax(-1)
        b = ref.boundaries([len(p) for p in prompts], slots)
        dec.hidden_states(torch.tensor(sum(prompts, [])), b, cache=ref)
        for _ in range(6):
            got = sd.step(slots, tokens)
            b = ref.boundaries([1] * len(slots), slots)
            want = dec.logits(dec.hidden_states(tokens, b, cache=ref))
            errors.append(float((got - want).abs().max()))
            agree &= got.argmax(-1).tolist() == want.argmax(-1).tolist()
            tokens = got.argmax(-1)
    return {"errors": errors, "agree": agree, "scale": float(want.abs().max()), "taken": taken,
            "layers": len(dec.layers), "linears": len(dec.linear_layers())}


if __name__ == "__main__":
    print(json.dumps(main()))
