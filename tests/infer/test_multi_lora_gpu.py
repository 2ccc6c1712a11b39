"""Rows of one batch on different adapters, on a CUDA GPU (decoder/multi_lora.py through the batcher).

Mixed decode steps are padded to their bucket and replayed from CUDA graphs (the stacked product; graphs
captured after `EAGER_STEPS`), which the tests check by the runner's capture count.
- fp32 (TF32 off): a batch mixing the base and two adapters answers token for token as each request alone;
- NF4 base in bf16: the same mix agrees with each alone on the first tokens of most requests (bf16 sums in
  another order can flip a near-tie; the agreement is printed, run with -s), and the seconds of a mixed and an
  unmixed batch of the same size are printed.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch
from run_folder import make_adapter_dir

from loratune.infer.batcher import Batcher, Submission
from loratune.infer.engine import Delta
from loratune.infer.load import load_engine
from loratune.infer.sampling import SamplingParams

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
              pytest.mark.usefixtures("exact_cuda_matmuls")]

PROMPTS = ["Hello", "What is QLoRA?", "Write a haiku about GPUs", "Count to five", "Name three colours",
           "Why is the sky blue?", "Translate 'cat' to French", "Tell me a joke"]


def _batch(engine, jobs: list[tuple[str, str]], n: int) -> tuple[list[list[int]], float, Batcher]:
    """Greedy token ids of each (name, prompt) decoded in one batch, the seconds it took, the batcher."""
    got: list[list[int]] = [[] for _ in jobs]
    batcher = Batcher(engine, slots=len(jobs), capacity=128)
    for i, (name, prompt) in enumerate(jobs):
        def emit(e, i=i) -> None:
            if isinstance(e, Delta) and e.token_id is not None:
                got[i].append(e.token_id)
        batcher.admit(Submission([engine.format(name).encode(prompt)], SamplingParams(max_new_tokens=n), name, emit,
                                 ignore_eos=True))
    torch.cuda.synchronize()
    start = time.perf_counter()
    while not batcher.empty:
        batcher.step()
    torch.cuda.synchronize()
    return got, time.perf_counter() - start, batcher


def _alone(engine, name: str, prompt: str, n: int) -> list[int]:
    events = engine.generate([engine.format(name).encode(prompt)], SamplingParams(max_new_tokens=n), name,
                             ignore_eos=True)
    return [e.token_id for e in events if isinstance(e, Delta) and e.token_id is not None]


@pytest.fixture(scope="module")
def adapter_4bit_b(tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_adapter_dir(tiny_llama, tmp_path_factory.mktemp("runs") / "q4b", bits=4, seed=6, rank=4)


def test_fp32_mixed_batch_equals_each_alone(adapter_a, adapter_b) -> None:
    engine = load_engine([str(adapter_a), str(adapter_b)], bits=32, implementation=None)
    assert engine.decoder and engine.model.embed.weight.is_cuda
    names = ["base", "alpha", "beta"]
    jobs = [(names[i % 3], p) for i, p in enumerate(PROMPTS)]
    got, _, batcher = _batch(engine, jobs, 16)
    assert batcher.mixed_passes > 0 and batcher.decoder.runner.captures > 0  # mixed steps replayed from graphs
    for (name, prompt), ids in zip(jobs, got):
        assert ids == _alone(engine, name, prompt, 16), (name, prompt)


def test_nf4_mixed_batch_agrees_with_each_alone(adapter_4bit, adapter_4bit_b) -> None:
    engine = load_engine([str(adapter_4bit), str(adapter_4bit_b)], implementation=None)
    assert engine.model.layers[0].attn.q_proj.quantized
    names = ["base", "q4", "q4b"]
    jobs = [(names[i % 3], p) for i, p in enumerate(PROMPTS)]
    n = 32
    _batch(engine, jobs, 4)  # warm-up (kernels, graphs)
    got, t_mixed, mixed = _batch(engine, jobs, n)
    _, t_one, unmixed = _batch(engine, [("q4", p) for p in PROMPTS], n)
    assert mixed.mixed_passes > 0 and unmixed.mixed_passes == 0 and mixed.decoder.runner.captures > 0
    same = sum(ids[:16] == _alone(engine, name, prompt, 16) for (name, prompt), ids in zip(jobs, got))
    print(f"NF4 bf16: {same}/{len(jobs)} mixed rows equal alone on 16 tokens; {len(jobs)} rows x {n} tokens: "
          f"mixed {t_mixed:.3f}s, one adapter {t_one:.3f}s")
    assert same >= len(jobs) * 3 // 4
