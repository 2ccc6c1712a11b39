"""GPU: the CUDA-graphed decode step (`loratune.decoder.decode_graphs`) against the same step run eagerly, and against
the cache's general path, on a small model of real widths (hidden 2048, 32 heads, 8 kv heads, 4 layers, NF4 via
bitsandbytes + LoRA r=16; `benchmarks/bench_decode.py`'s builder).

Run on the GPU machine: `python -m pytest tests/infer/test_decode_graphs_gpu.py -q -m gpu -s` (-s shows the
timing lines). Skipped without CUDA.

- graphed = eager: the replay runs the kernels the eager step launches, on the same padded inputs: the same
  tokens and (asserted) logits within 1e-3 of their scale in bf16, while rows join and leave and cross batch
  and key buckets;
- graphed = the general path (`Decoder.hidden_states` over the `KVCache`) in fp32: the same greedy tokens;
- a changed adapter is seen by the next replay (the graphs are captured again);
- timing: printed, not asserted.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest
import torch

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

sys.path.insert(0, str(Path(__file__).parents[2] / "benchmarks"))


@pytest.fixture(scope="module")
def small_bf16():
    from bench_decode import build_models

    return build_models("small", "cuda", dtype=torch.bfloat16)[1]


def _prompts(n: int, length: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 32000, (length + 7 * i,), generator=g).tolist() for i in range(n)]


def _schedule(dec, graphs: bool, steps: int = 40) -> tuple[list[list[int]], list[torch.Tensor], int]:
    """Rows joining and leaving 6 slots: 3 prompts, one leaves at step 10 and another prompt takes its slot and
    two more join at step 20. Returns (tokens of each step, logits of each step, graphs captured)."""
    from loratune.decoder.generate import SlotDecoder

    sd = SlotDecoder(dec, 6, 200, graphs=graphs)
    ps = _prompts(6, 40, seed=1)
    toks: list[list[int]] = []
    logits_seen: list[torch.Tensor] = []
    with torch.inference_mode(), dec.frozen_adapters():
        live = dict(zip([0, 2, 5], sd.prefill([0, 2, 5], ps[:3]).argmax(-1).tolist()))
        for i in range(steps):
            if i == 10:
                sd.release([2])
                del live[2]
                live[2] = int(sd.prefill([2], [ps[3]]).argmax(-1)[0])
            if i == 20:
                live.update(zip([1, 3], sd.prefill([1, 3], ps[4:6]).argmax(-1).tolist()))
            slots = sorted(live)
            logits = sd.step(slots, torch.tensor([live[s] for s in slots]))
            logits_seen.append(logits.float().cpu())
            new = logits.argmax(-1).tolist()
            live.update(zip(slots, new))
            toks.append(new)
    return toks, logits_seen, sd.runner.captures


def test_graphed_equals_eager_while_rows_join_and_leave(small_bf16) -> None:
    eager_toks, eager_logits, none = _schedule(small_bf16, graphs=False)
    toks, logits, captures = _schedule(small_bf16, graphs=True)
    # batch buckets 4 (3 rows) and 8 (5 rows); one graph each with the Triton decode attention, else also one per
    # key bucket (64, 128)
    from loratune.decoder.decode_step import attention_kernel

    assert none == 0 and captures == (2 if attention_kernel(small_bf16, torch.device("cuda")) else 3)
    assert toks == eager_toks
    for a, b in zip(logits, eager_logits):
        assert (a - b).abs().max() <= 1e-3 * b.abs().max()


def test_graphed_equals_the_general_path_in_fp32(exact_cuda_matmuls) -> None:
    from bench_decode import build_models

    from loratune.decoder.generate import SlotDecoder

    _, dec = build_models("small", "cuda", dtype=torch.float32, seed=3)
    prompt = _prompts(1, 30, seed=2)[0]
    sd = SlotDecoder(dec, 2, 100, graphs=True)
    ref = dec.new_cache(2, 100)
    with torch.inference_mode():
        tok = int(sd.prefill([1], [prompt]).argmax(-1)[0])
        b = ref.boundaries([len(prompt)], [1])
        ref_tok = int(dec.logits(dec.hidden_states(torch.tensor(prompt, device="cuda"), b, cache=ref)[-1:]).argmax())
        assert tok == ref_tok
        for _ in range(24):
            got = sd.step([1], torch.tensor([tok]))
            b = ref.boundaries([1], [1])
            want = dec.logits(dec.hidden_states(torch.tensor([ref_tok], device="cuda"), b, cache=ref))
            assert (got - want).abs().max() <= 1e-3 * want.abs().max()
            tok, ref_tok = int(got.argmax()), int(want.argmax())
            assert tok == ref_tok
    assert sd.runner.captures == 1


def test_a_changed_adapter_is_captured_again(small_bf16) -> None:
    from loratune.decoder.generate import SlotDecoder

    dec = small_bf16
    sd = SlotDecoder(dec, 1, 100, graphs=True)
    sd.runner.eager_steps = 0  # captured at the first step
    prompt = _prompts(1, 20, seed=4)[0]
    layer = next(iter(dec.adapted_layers().values()))
    saved = layer.lora_B.detach().clone()
    with torch.inference_mode():
        sd.prefill([0], [prompt])
        before = sd.step([0], torch.tensor([7])).float().clone()
        sd.release([0])
        sd.prefill([0], [prompt])
        assert sd.runner.captures == 1
        layer.set_adapter_weights(layer.lora_A.detach(), saved * 50)
        after = sd.step([0], torch.tensor([7])).float()
        assert sd.runner.captures == 2
        layer.set_adapter_weights(layer.lora_A.detach(), saved)
    assert (after - before).abs().max() > 1e-2


def test_timing_print(small_bf16) -> None:
    """ms per decode step, eager and graphed (printed; not a timed assertion)."""
    from loratune.decoder.generate import SlotDecoder

    dec = small_bf16
    for rows in (1, 8, 32):
        line = []
        for graphs in (False, True):
            sd = SlotDecoder(dec, rows, 300, graphs=graphs)
            with torch.inference_mode(), dec.frozen_adapters():
                tokens = sd.prefill(list(range(rows)), _prompts(rows, 20, seed=rows)).argmax(-1)
                for _ in range(3):
                    tokens = sd.step(list(range(rows)), tokens).argmax(-1)
                torch.cuda.synchronize()
                start = time.perf_counter()
                for _ in range(50):
                    tokens = sd.step(list(range(rows)), tokens).argmax(-1).cpu()
                torch.cuda.synchronize()
            line.append(f"{'graphed' if graphs else 'eager'} {(time.perf_counter() - start) / 50 * 1e3:.2f} ms")
        print(f"small model decode step, {rows} rows: " + ", ".join(line))
        assert line
