"""The bucketed decode step (`loratune.decoder.decode_graphs`, eager on the CPU) against the cache's general path.

The general path is `Decoder.hidden_states` over a `KVCache` with host boundaries (the prefill and the path
the generation engine used before); the new step pads rows to a batch bucket by repeating the first row,
reads positions from the cache's device lengths and attends over a key bucket with per-row masks. Both
run side by side on two caches of the same decoder, rows joining and leaving between steps (continuous
batching), through every tiny family (sliding windows, soft-caps, q/k norms, fused projections, longrope),
an NF4 base, and LoRA adapters. fp32 on the CPU: logits within 2e-5 (they differ in summation order in the
attention only), and the greedy tokens equal.
"""

from __future__ import annotations

import pytest
import torch
from decoder_families import NAMES, load_pair, run_config, sample_ids

from loratune.decoder import decode_graphs
from loratune.decoder.decode_graphs import DecodeRunner, batch_bucket, key_bucket
from loratune.decoder.generate import SlotDecoder

TOL = 2e-5


def _general_step(dec, cache, slots: list[int], tokens: list[int]) -> torch.Tensor:
    b = cache.boundaries([1] * len(slots), slots)
    hidden = dec.hidden_states(torch.tensor(tokens), b, cache=cache)
    return dec.logits(hidden)


def _run_both(dec, steps: int = 9) -> int:
    """Prompts join and leave 5 slots over `steps` steps; both paths are asserted equal. Returns the number of
    rows stepped in all (so a caller sees the schedule ran)."""
    new = SlotDecoder(dec, 5, 40, graphs=False)
    ref = dec.new_cache(5, 40)
    prompts = [p.tolist() for p in sample_ids((7, 12, 3, 5), seed=9)]
    # prompt 0 in slot 4, prompt 1 in slot 1, prompt 2 in slot 2; prompt 3 joins slot 4 when row 0 leaves
    live: dict[int, int] = {}
    start = new.prefill([4, 1, 2], prompts[:3])
    b = ref.boundaries([7, 12, 3], [4, 1, 2])
    want = dec.logits(dec.hidden_states(torch.tensor(sum(prompts[:3], [])), b, cache=ref)[b.cu_seqlens[1:].long() - 1])
    torch.testing.assert_close(start, want, rtol=0, atol=TOL)
    for slot, row in zip((4, 1, 2), start):
        live[slot] = int(row.argmax())
    stepped = 0
    for i in range(steps):
        if i == 3:  # slot 4 leaves, then takes a new prompt, prefilled while the others decode
            new.release([4])
            ref.release([4])
            del live[4]
            got = new.prefill([4], [prompts[3]])
            b = ref.boundaries([5], [4])
            want = dec.logits(dec.hidden_states(torch.tensor(prompts[3]), b, cache=ref)[-1:])
            torch.testing.assert_close(got, want, rtol=0, atol=TOL)
            live[4] = int(got[0].argmax())
        slots = sorted(live, reverse=i % 2 == 1)  # any order of slots
        if i == 6:
            slots = slots[:2]  # a row sits a step out (it has finished in the caller's eyes)
        tokens = [live[s] for s in slots]
        got = new.step(slots, torch.tensor(tokens))
        want = _general_step(dec, ref, slots, tokens)
        assert got.shape == want.shape
        torch.testing.assert_close(got, want, rtol=0, atol=TOL)
        assert got.argmax(-1).tolist() == want.argmax(-1).tolist()
        for s, row in zip(slots, got):
            live[s] = int(row.argmax())
        stepped += len(slots)
    assert new.cache.lengths == ref.lengths
    assert new.cache.device_lengths.tolist() == ref.lengths
    for layer in range(len(ref.keys)):  # the same keys written at the same places (padding rows add nothing)
        torch.testing.assert_close(new.cache.keys[layer], ref.keys[layer], rtol=0, atol=TOL)
    return stepped


@pytest.mark.parametrize("name", NAMES)
def test_bucketed_step_equals_the_general_path(name, checkpoint, quiet):
    _, dec = load_pair(run_config(checkpoint(name)))
    with torch.inference_mode():
        assert _run_both(dec) > 20


def test_with_lora_and_small_key_buckets(checkpoint, quiet, monkeypatch):
    """Adapters on every layer (their casts made by the step itself), keys in buckets of 4 so that rows cross
    several buckets; an adapter changed between steps is seen at the next step."""
    monkeypatch.setattr(decode_graphs, "MIN_KEYS", 4)
    _, dec = load_pair(run_config(checkpoint("qwen2")))
    dec.add_adapters(4, 8, seed=0)
    g = torch.Generator().manual_seed(2)
    for layer in dec.adapted_layers().values():
        layer.set_adapter_weights(torch.randn(layer.lora_A.shape, generator=g) * 0.2,
                                  torch.randn(layer.lora_B.shape, generator=g) * 0.3)
    with torch.inference_mode():
        assert _run_both(dec, steps=6) > 10
        sd = SlotDecoder(dec, 1, 20, graphs=False)
        prompt = sample_ids((4,), seed=3)[0].tolist()
        sd.prefill([0], [prompt])
        before = sd.step([0], torch.tensor([5]))
        sd.release([0])
        sd.prefill([0], [prompt])
        layer = next(iter(dec.adapted_layers().values()))
        layer.set_adapter_weights(layer.lora_A * 0, layer.lora_B)
        after = sd.step([0], torch.tensor([5]))
        assert (after - before).abs().max() > 1e-3  # the edited adapter is used


def test_nf4_base(checkpoint, quiet):
    cfg = run_config(checkpoint("llama"), "quantization.bits=4", "quantization.quant_type=nf4",
                     "quantization.double_quant=true")
    _, dec = load_pair(cfg)
    assert next(iter(dec.linear_layers().values())).quantized
    with torch.inference_mode():
        assert _run_both(dec, steps=5) > 10


def test_buckets_and_refusals(checkpoint, quiet):
    assert [batch_bucket(n) for n in (1, 2, 3, 5, 9, 17, 32)] == [1, 2, 4, 8, 16, 32, 32]
    assert key_bucket(1, 4096) == 64 and key_bucket(65, 4096) == 128 and key_bucket(1000, 600) == 600
    _, dec = load_pair(run_config(checkpoint("llama")))
    with torch.inference_mode():
        sd = SlotDecoder(dec, 3, 8, graphs=False)
        assert isinstance(sd.runner, DecodeRunner) and not sd.runner.graphs
        with pytest.raises(ValueError, match="hold no prompt"):
            sd.step([0], torch.tensor([3]))
        sd.prefill([0], [[3, 4, 5, 6, 7, 8, 9]])
        with pytest.raises(ValueError, match="distinct slots"):
            sd.step([0, 0], torch.tensor([3, 3]))
        sd.step([0], torch.tensor([3]))
        from loratune.decoder.cache import CacheFull

        with pytest.raises(CacheFull, match="made for 8"):
            sd.step([0], torch.tensor([3]))


@pytest.mark.slow
def test_the_step_with_its_triton_kernels_under_the_interpreter_equals_the_general_path() -> None:
    """The NF4 matvec (LoRA through stacked x A^T slices) and decode attention kernels inside the step itself,
    run by Triton's interpreter on a tiny NF4 Llama with LoRA (see `decode_kernels_cases`): fp32 logits within
    1e-5 of the general path's (measured 2.4e-7), the same greedy tokens, every projection and layer through
    the kernels."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    pytest.importorskip("triton")
    script = Path(__file__).with_name("decode_kernels_cases.py")
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=400,
                          env={**os.environ, "TRITON_INTERPRET": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    steps = len(r["errors"])
    assert steps == 6 and r["agree"] and r["scale"] > 0.3
    assert max(r["errors"]) < 1e-5
    assert r["taken"] == {"matvec": r["linears"] * steps, "attention": r["layers"] * steps}
