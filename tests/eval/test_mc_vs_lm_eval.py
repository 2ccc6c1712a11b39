"""Multiple-choice scoring against lm-evaluation-harness itself, on the same tiny model and the same files.

lm-evaluation-harness (`lm_eval`) runs in-process: its `HFLM` loads the tiny model's folder and its own MMLU
prompt templates (`mmlu` for the letters style, `mmlu_continuation` for cloze) read the JSON Lines copy of
the benchmark. loratune reads the original release's CSV layout of the same questions and scores them with
its batched, prefix-sharing paths: on the transformers model (padded rows) and on loratune's decoder over the
same tensors (padding-free streams). Every choice's log-likelihood must agree within 1e-4, and every question's
acc and acc_norm must be identical.
"""

from __future__ import annotations

from pathlib import Path

import pytest

lm_eval = pytest.importorskip("lm_eval")

from loratune.decoder.model import Decoder  # noqa: E402
from loratune.eval.config import MCTaskConfig  # noqa: E402
from loratune.eval.decoder_view import decoder_over  # noqa: E402
from loratune.eval.mc import prepare, question_metrics, score_questions  # noqa: E402
from loratune.eval.mcdata import load_benchmark  # noqa: E402
from loratune.infer.load import load_engine  # noqa: E402

TEMPLATES = {  # lm-evaluation-harness's tasks/mmlu/default and tasks/mmlu/continuation, verbatim
    "letters": dict(doc_to_text="{{question.strip()}}\nA. {{choices[0]}}\nB. {{choices[1]}}\nC. {{choices[2]}}\nD. "
                                "{{choices[3]}}\nAnswer:", doc_to_choice=["A", "B", "C", "D"],
                    description="The following are multiple choice questions (with answers) about {}.\n\n"),
    "cloze": dict(doc_to_text="Question: {{question.strip()}}\nAnswer:", doc_to_choice="{{choices}}",
                  description="The following are questions (with answers) about {}.\n\n"),
}
SHOTS = {"letters": 2, "cloze": 1}


def _lm_eval_samples(model_dir: Path, files: dict[str, dict[str, Path]]) -> dict[tuple[str, str], list[dict]]:
    from lm_eval.models.huggingface import HFLM

    tasks = []
    for style, tpl in TEMPLATES.items():
        for subject, split_files in files.items():
            tasks.append(dict(
                task=f"{style}__{subject}", dataset_path="json",
                dataset_kwargs={"data_files": {k: str(v) for k, v in split_files.items()}},
                test_split="test", fewshot_split="dev", fewshot_config={"sampler": "first_n"},
                num_fewshot=SHOTS[style], output_type="multiple_choice", doc_to_target="answer",
                doc_to_text=tpl["doc_to_text"], doc_to_choice=tpl["doc_to_choice"],
                description=tpl["description"].format(subject.replace("_", " ")),
                metric_list=[{"metric": "acc", "aggregation": "mean", "higher_is_better": True},
                             {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True}]))
    lm = HFLM(pretrained=str(model_dir), batch_size=4, device="cpu", dtype="float32")
    out = lm_eval.simple_evaluate(model=lm, tasks=tasks, log_samples=True, bootstrap_iters=0)
    samples = {}
    for name, rows in out["samples"].items():
        style, subject = name.split("__")
        samples[(style, subject)] = sorted(rows, key=lambda s: s["doc_id"])
    return samples


@pytest.mark.parametrize("family", ["llama", pytest.param("qwen2", marks=pytest.mark.slow)])  # BOS added; no BOS
def test_loglikelihoods_and_accuracies_match_lm_eval(family: str, tiny_models: dict[str, Path], mmlu_dir: Path,
                                                     mmlu_jsonl: dict[str, dict[str, Path]]) -> None:
    reference = _lm_eval_samples(tiny_models[family], mmlu_jsonl)
    engine = load_engine([str(tiny_models[family])], implementation="transformers")
    tokenizer = engine.format().tokenizer
    decoder = decoder_over(engine.model)
    assert isinstance(decoder, Decoder)
    compared = 0
    for style, net in ((s, n) for s in TEMPLATES for n in (engine.model, decoder)):
        task = MCTaskConfig(name="mmlu", path=str(mmlu_dir), shots=SHOTS[style], style=style)
        bench = load_benchmark(task)
        records = score_questions(net, prepare(bench, task, tokenizer, 2048), style, batch_size=3)
        for subject in mmlu_jsonl:
            ours = [r for r in records if r["subject"] == subject]
            theirs = reference[(style, subject)]
            assert len(ours) == len(theirs) > 0
            for mine, ref in zip(ours, theirs):
                lls = [ll for ll, _ in ref["filtered_resps"]]
                assert mine["logprobs"] == pytest.approx(lls, abs=1e-4)
                assert mine["greedy"] == [g for _, g in ref["filtered_resps"]]
                metrics = question_metrics(mine, style)
                assert (metrics["acc"], metrics["acc_norm"]) == (ref["acc"], ref["acc_norm"])
                compared += 1
    assert compared == 2 * 2 * 9
