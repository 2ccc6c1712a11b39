"""`loratune eval`'s scoring on a CUDA GPU: loratune's decoder over the engine's tensors against the transformers
model, with the tiny Llama.

- fp32 base and compute (TF32 off): per-choice log-likelihoods and perplexity NLLs equal within 1e-4;
- NF4 base, bf16 compute (the QLoRA setting): the decoder agrees with transformers to bf16 rounding (the
  largest difference is printed; run with -s) and picks the same choice for nearly every question;
- train.eval_benchmark during a bf16 training run on either model code.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from loratune.eval.config import EvalModelConfig, MCTaskConfig
from loratune.eval.decoder_loglik import DecoderScorer
from loratune.eval.mc import prepare, score_questions
from loratune.eval.mcdata import load_benchmark
from loratune.eval.models import load, plan, scoring, selected

sys.path.insert(0, str(Path(__file__).parent.parent / "infer"))
from run_folder import make_adapter_dir  # noqa: E402

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
              pytest.mark.usefixtures("exact_cuda_matmuls")]


@pytest.mark.parametrize(("bits", "tol"), [(32, 1e-4), (4, None)])
def test_decoder_scoring_on_cuda_equals_transformers(bits: int, tol: float | None, tiny_llama: Path,
                                                     mmlu_dir: Path, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    folder = make_adapter_dir(tiny_llama, tmp_path / "a", bits=bits, seed=4)
    (group,) = plan([EvalModelConfig(name="tuned", path=str(folder), bits=bits)])
    # a transformers engine chosen by the environment (as a run trained there would be): the decoder scores over its
    # tensors; load(group, "transformers") would ask for transformers alone, no decoder view
    monkeypatch.setenv("LORATUNE_IMPLEMENTATION", "transformers")
    loaded = load(group)
    assert next(loaded.engine.model.parameters()).is_cuda
    task = MCTaskConfig(name="mmlu", path=str(mmlu_dir), shots=2, style="cloze")  # multi-token choices
    prepared = prepare(load_benchmark(task), task, loaded.engine.format("tuned").tokenizer, 2048)
    with scoring(loaded, "tuned") as net:
        assert type(net).__name__ == "Decoder" and net.embed.weight.is_cuda
        ours = score_questions(net, prepared, "cloze", batch_size=3)
        assert isinstance(DecoderScorer(net), DecoderScorer)
    with selected(loaded.engine, "tuned") as hf:
        ref = score_questions(hf, prepared, "cloze", batch_size=3)
    diffs = [abs(a - b) for x, y in zip(ours, ref) for a, b in zip(x["logprobs"], y["logprobs"])]
    same = sum(max(range(4), key=lambda i: x["logprobs"][i]) == max(range(4), key=lambda i: y["logprobs"][i])
               for x, y in zip(ours, ref))
    print(f"bits {bits}: largest |loglik difference| {max(diffs):.2e}, same prediction {same}/{len(ours)}")
    if tol is not None:
        assert max(diffs) < tol and same == len(ours)
    else:  # bf16: rounding differs between the two paths, not the numbers
        assert max(diffs) < 0.25 and same >= len(ours) - 1


@pytest.mark.parametrize("implementation", ["loratune", "transformers"])
def test_benchmark_during_training_on_cuda(implementation: str, tiny_llama: Path, mmlu_dir: Path,
                                           tmp_path: Path) -> None:
    """train.eval_benchmark on the GPU, both model codes (bf16 compute, NF4 base): rows at steps 0, 2, 4, finite."""
    sys.path.insert(0, str(Path(__file__).parent.parent / "train"))
    from train_helpers import config, write_run_yaml

    from loratune.train.metrics import read_rows
    from loratune.train.run import train

    run = write_run_yaml(tmp_path, tiny_llama, model={"path": str(tiny_llama), "implementation": implementation},
                         train={"max_steps": 4, "deterministic": False, "eval_benchmark": {
                             "path": str(mmlu_dir), "name": "mmlu", "shots": 2, "every": 2}})
    train(config(run))
    rows = [r for r in read_rows(tmp_path / "out" / "metrics.jsonl") if "benchmark_acc" in r]
    assert [r["step"] for r in rows] == [0, 2, 4]
    assert all(r["benchmark_n"] == 9 and r["benchmark_answer_logprob"] is not None and 0 <= r["benchmark_acc"] <= 1
               for r in rows)
