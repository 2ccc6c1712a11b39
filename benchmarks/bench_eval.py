"""Multiple-choice evaluation speed: `loratune eval`'s scoring against lm-evaluation-harness, one model, one process.

What it does, for one named model shape:
1. builds random bf16 weights of the shape (saved once to a folder and loaded back through `from_pretrained`,
   as users load checkpoints) with a byte-level BPE tokenizer trained offline (`loratune.model.tiny`; no hub);
2. writes a local MMLU-format benchmark: `--questions` questions over `--subjects` subjects in the original
   release's layout (headerless `test/SUBJECT_test.csv`, `dev/SUBJECT_dev.csv`) and the same questions as JSON
   Lines for lm-evaluation-harness; question and choice texts are random words of MMLU-like lengths;
3. loads the model once as `loratune eval` does (`loratune.infer.load.load_engine`, NF4 with `--bits 4`) and
   scores the benchmark `--shots`-shot, letters style (lm-evaluation-harness's `mmlu` prompt), with:
   - `loratune`: `loratune eval`'s code (`eval.mc.prepare` + `score_questions` on `eval.models.scoring`: loratune's
     decoder over the engine's tensors, padding-free streams, few-shot prefix prefilled once per subject);
   - `loratune-hf` (`--paths`): the same code on the transformers model (the fallback for other architectures);
   - `lm_eval`: `lm_eval.simple_evaluate` with its `HFLM` class on the same loaded model object, the
     benchmark's JSON Lines as tasks built from lm-evaluation-harness's `mmlu` template (as tests/eval does).
   Each path first runs once on a few questions (warm-up, untimed); the timed run covers tokenization and
   scoring (for lm_eval also its task building), not loading.
4. prints questions/s of each path, the ratio to lm_eval, the peak GPU memory of each path's timed run (weights
   included), the accuracies, and the agreement with lm_eval:
   largest and median |difference| of the per-choice log-likelihoods and the share of questions whose
   prediction (acc) is the same. (In bf16 the paths round differently, so log-likelihoods agree to about
   1e-2, not the 1e-4 of the fp32 tests.)

On the GPU machine lm-evaluation-harness and what it imports there come as wheels (../shared/gpu/wheels.sh, from
the project root; the versions the CPU smoke test passes with):
    ../shared/gpu/wheels.sh lm_eval==0.4.13 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 xxhash==4.1.0 \
        fsspec==2026.9.0 sacrebleu==2.6.0 portalocker==4.4.2 tabulate==0.10.0 colorama==0.4.6 lxml==6.1.3 \
        requests==2.34.2 urllib3==2.8.0 idna==3.20 certifi==2026.10.19.post1 charset-normalizer==3.5.3
(datasets 5.2 wants pyarrow >= 24 and huggingface-hub >= 1.31 at run time; `--paths loratune,loratune-hf` runs
without lm_eval.)

Usage:
    python benchmarks/bench_eval.py --shape llama3-8b --questions 1000 --out-dir $OUT      (GPU)
    python benchmarks/bench_eval.py --shape tiny --device cpu --questions 24 --subjects 3   (smoke, CPU)
Writes bench_eval_<shape>.json and table_eval_<shape>.md under --out-dir.
"""

from __future__ import annotations

import argparse
import csv
import json
import random
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_common import SHAPES, build_model, free, log  # noqa: E402

LETTERS = "ABCD"
MMLU_TEXT = ("{{question.strip()}}\nA. {{choices[0]}}\nB. {{choices[1]}}\nC. {{choices[2]}}\nD. {{choices[3]}}"
             "\nAnswer:")  # lm-evaluation-harness's tasks/mmlu/default template
DESCRIPTION = "The following are multiple choice questions (with answers) about {}.\n\n"


# --------------------------------------------------------------------------------------------- inputs


def _words(rng: random.Random, vocab: list[str], lo: int, hi: int) -> str:
    return " ".join(rng.choice(vocab) for _ in range(rng.randint(lo, hi)))


def write_benchmark(root: Path, questions: int, subjects: int, shots: int, seed: int = 0) -> dict:
    """MMLU-format files under root/mmlu (CSV, release layout) and root/jsonl (hub schema); {subject: {split:
    jsonl file}}. Question lengths follow MMLU's spread (mostly 10-60 words, some long passages)."""
    from loratune.model.tiny import _corpus

    vocab = sorted({w.strip(".,;:!?\"'()") for line in _corpus() for w in line.split()} - {""})
    rng = random.Random(seed)
    names = [f"subject_{i:02d}" for i in range(subjects)]
    per = [questions // subjects + (1 if i < questions % subjects else 0) for i in range(subjects)]
    files: dict[str, dict[str, Path]] = {}
    for name, n in zip(names, per):
        for split, count in (("test", n), ("dev", shots)):
            rows = []
            for _ in range(count):
                long = rng.random() < 0.15
                q = _words(rng, vocab, 60, 200) if long else _words(rng, vocab, 10, 60)
                rows.append((q + "?", [_words(rng, vocab, 1, 10) for _ in LETTERS], rng.randrange(4)))
            folder = root / "mmlu" / split
            folder.mkdir(parents=True, exist_ok=True)
            with (folder / f"{name}_{split}.csv").open("w", newline="", encoding="utf-8") as f:
                w = csv.writer(f)
                for q, c, a in rows:
                    w.writerow([q, *c, LETTERS[a]])
            jl = root / "jsonl" / f"{name}_{split}.jsonl"
            jl.parent.mkdir(parents=True, exist_ok=True)
            jl.write_text("".join(json.dumps({"question": q, "subject": name, "choices": c, "answer": a}) + "\n"
                                  for q, c, a in rows), encoding="utf-8")
            files.setdefault(name, {})[split] = jl
    return files


# ---------------------------------------------------------------------------------------------- paths


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def run_loratune(loaded, root: Path, subjects: list[str] | None, shots: int, batch_size: int, device: str,
                 on_decoder: bool) -> tuple[list[dict], float, str]:
    """`loratune eval`'s scoring of the benchmark: (records in file order, seconds, which network scored)."""
    from loratune.eval.config import MCTaskConfig
    from loratune.eval.mc import prepare, score_questions
    from loratune.eval.mcdata import load_benchmark
    from loratune.eval.models import scoring, selected

    task = MCTaskConfig(name="mmlu", path=str(root / "mmlu"), shots=shots, style="letters",
                        subjects=subjects or [])
    name = next(iter(loaded.names))
    sync(device)
    t = time.perf_counter()
    bench = load_benchmark(task)
    tokenizer = loaded.engine.format(loaded.names[name]).tokenizer
    prepared = prepare(bench, task, tokenizer, loaded.engine.context_length)
    context = scoring(loaded, name) if on_decoder else selected(loaded.engine, loaded.names[name])
    with context as net:
        records = score_questions(net, prepared, "letters", batch_size=batch_size)
        which = type(net).__name__
    sync(device)
    return records, time.perf_counter() - t, which


def lm_eval_tasks(files: dict[str, dict[str, Path]], shots: int) -> list[dict]:
    return [dict(task=f"bench__{subject}", dataset_path="json",
                 dataset_kwargs={"data_files": {k: str(v) for k, v in split_files.items()}},
                 test_split="test", fewshot_split="dev", fewshot_config={"sampler": "first_n"}, num_fewshot=shots,
                 output_type="multiple_choice", doc_to_target="answer", doc_to_text=MMLU_TEXT,
                 doc_to_choice=list(LETTERS), description=DESCRIPTION.format(subject.replace("_", " ")),
                 metric_list=[{"metric": "acc", "aggregation": "mean", "higher_is_better": True}])
            for subject, split_files in files.items()]


def run_lm_eval(model, tokenizer, files: dict[str, dict[str, Path]], shots: int, batch_size: int | str,
                device: str) -> tuple[dict[str, list[dict]], float]:
    """lm-evaluation-harness on the same model object: ({subject: samples in doc order}, seconds)."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    sync(device)
    t = time.perf_counter()
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    out = lm_eval.simple_evaluate(model=lm, tasks=lm_eval_tasks(files, shots), log_samples=True, bootstrap_iters=0)
    sync(device)
    seconds = time.perf_counter() - t
    samples = {name.split("__", 1)[1]: sorted(rows, key=lambda s: s["doc_id"]) for name, rows in out["samples"].items()}
    return samples, seconds


# -------------------------------------------------------------------------------------------- compare


def agreement(records: list[dict], samples: dict[str, list[dict]]) -> dict:
    """|log-likelihood differences| (max, median) and the share of questions with the same prediction."""
    diffs, same, n = [], 0, 0
    by_subject: dict[str, list[dict]] = {}
    for r in records:
        by_subject.setdefault(r["subject"], []).append(r)
    for subject, ours in by_subject.items():
        theirs = samples[subject]
        if len(ours) != len(theirs):
            raise RuntimeError(f"{subject}: {len(ours)} questions scored here, {len(theirs)} by lm_eval")
        for mine, ref in zip(ours, theirs):
            lls = [ll for ll, _ in ref["filtered_resps"]]
            diffs += [abs(a - b) for a, b in zip(mine["logprobs"], lls)]
            same += int(max(range(4), key=lambda i: mine["logprobs"][i]) == max(range(4), key=lambda i: lls[i]))
            n += 1
    return {"max_abs_diff": max(diffs), "median_abs_diff": statistics.median(diffs), "same_prediction": same / n}


def accuracy(records: list[dict]) -> float:
    return sum(max(range(len(r["logprobs"])), key=lambda i: r["logprobs"][i]) == r["answer"] for r in records) / len(records)


def lm_eval_accuracy(samples: dict[str, list[dict]]) -> float:
    rows = [s for rows in samples.values() for s in rows]
    return sum(s["acc"] for s in rows) / len(rows)


# ----------------------------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shape", default="llama3-8b", choices=sorted(SHAPES))
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cuda", "cpu"])
    p.add_argument("--bits", type=int, default=4, choices=[4, 16], help="base precision (4: NF4, as QLoRA)")
    p.add_argument("--questions", type=int, default=1000)
    p.add_argument("--subjects", type=int, default=20)
    p.add_argument("--shots", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=32, help="loratune: contexts scored together")
    p.add_argument("--lm-eval-batch-size", default="32", help="lm_eval HFLM batch size (a number or auto)")
    p.add_argument("--paths", default="loratune,lm_eval", help="comma-separated: loratune, loratune-hf, lm_eval")
    p.add_argument("--work-dir", default="/tmp/bench-eval", help="where the model and the benchmark files go")
    p.add_argument("--out-dir", default="bench-out")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    paths = [x.strip() for x in args.paths.split(",") if x.strip()]
    unknown = set(paths) - {"loratune", "loratune-hf", "lm_eval"}
    if unknown:
        raise SystemExit(f"unknown --paths {sorted(unknown)}")
    work, out = Path(args.work_dir), Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    folder = build_model(args.shape, work / f"model-{args.shape}", args.device)
    files = write_benchmark(work / f"bench-{args.questions}-{args.subjects}-{args.shots}", args.questions,
                            args.subjects, args.shots)
    root = next(iter(files.values()))["test"].parents[1]

    from loratune.eval.models import Loaded
    from loratune.infer.load import load_engine

    t = time.time()
    # the transformers model in the engine (lm_eval's HFLM takes it); loratune's decoder is built over its tensors
    engine = load_engine([str(folder)], bits=args.bits if args.bits != 16 else None, implementation="transformers")
    if args.device == "cpu" and next(engine.model.parameters()).device.type != "cpu":
        raise SystemExit("the model loaded off the CPU; run with --device cuda")
    loaded = Loaded(engine, {"model": "base"}, {"model": None})
    log(f"loaded {args.shape} ({args.bits}-bit) in {time.time() - t:.0f}s on {next(engine.model.parameters()).device}")
    hf_model = engine.model
    tokenizer = engine.format().tokenizer
    warm = [next(iter(files))]
    lm_bs = args.lm_eval_batch_size if args.lm_eval_batch_size == "auto" else int(args.lm_eval_batch_size)

    results: dict[str, dict] = {}
    records: dict[str, list[dict]] = {}
    lm_samples = None
    for path in paths:
        if args.device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        if path == "lm_eval":
            run_lm_eval(hf_model, tokenizer, {warm[0]: files[warm[0]]}, args.shots, lm_bs, args.device)  # warm-up
            lm_samples, seconds = run_lm_eval(hf_model, tokenizer, files, args.shots, lm_bs, args.device)
            n = sum(len(v) for v in lm_samples.values())
            results[path] = {"seconds": seconds, "questions": n, "accuracy": lm_eval_accuracy(lm_samples)}
        else:
            on_decoder = path == "loratune"
            run_loratune(loaded, root, warm, args.shots, args.batch_size, args.device, on_decoder)  # warm-up
            recs, seconds, which = run_loratune(loaded, root, None, args.shots, args.batch_size, args.device,
                                                on_decoder)
            records[path] = recs
            results[path] = {"seconds": seconds, "questions": len(recs), "accuracy": accuracy(recs), "network": which,
                             "mean_context_tokens": statistics.mean(r["tokens"] for r in recs)}
        results[path]["questions_per_s"] = results[path]["questions"] / results[path]["seconds"]
        if args.device == "cuda":  # weights included
            results[path]["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
        log(f"{path}: {results[path]['questions']} questions in {results[path]['seconds']:.1f}s "
            f"({results[path]['questions_per_s']:.2f}/s), accuracy {results[path]['accuracy']:.4f}")
        free()
    if lm_samples is not None:
        for path, recs in records.items():
            results[path]["vs_lm_eval"] = agreement(recs, lm_samples)
            results[path]["speedup_vs_lm_eval"] = results[path]["questions_per_s"] / results["lm_eval"]["questions_per_s"]

    device = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    report = {"shape": args.shape, "bits": args.bits, "device": device, "shots": args.shots,
              "questions": args.questions, "subjects": args.subjects, "batch_size": args.batch_size,
              "lm_eval_batch_size": args.lm_eval_batch_size, "results": results,
              "versions": {"torch": torch.__version__, **_versions()}}
    (out / f"bench_eval_{args.shape}.json").write_text(json.dumps(report, indent=2))
    table = render(report)
    (out / f"table_eval_{args.shape}.md").write_text(table)
    print(table, flush=True)
    return report


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("transformers", "bitsandbytes", "lm_eval", "loratune"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "-"
    return out


def render(report: dict) -> str:
    r = report["results"]
    lines = [f"{report['shape']} ({report['bits']}-bit), {report['questions']} questions over {report['subjects']} "
             f"subjects, {report['shots']}-shot, on {report['device']}", "",
             "| path | questions/s | vs lm_eval | peak GiB | accuracy | same prediction as lm_eval | "
             "max / median abs loglik diff |",
             "|---|---|---|---|---|---|---|"]
    for path, x in r.items():
        v = x.get("vs_lm_eval")
        lines.append(f"| {path}{' (' + x['network'] + ')' if 'network' in x else ''} | {x['questions_per_s']:.2f} | "
                     f"{format(x['speedup_vs_lm_eval'], '.2f') + 'x' if 'speedup_vs_lm_eval' in x else '-'} | "
                     f"{format(x['peak_gib'], '.2f') if 'peak_gib' in x else '-'} | "
                     f"{x['accuracy']:.4f} | {format(v['same_prediction'], '.1%') if v else '-'} | "
                     f"{format(v['max_abs_diff'], '.2e') + ' / ' + format(v['median_abs_diff'], '.2e') if v else '-'} |")
    ctx = [x["mean_context_tokens"] for x in r.values() if "mean_context_tokens" in x]
    if ctx:
        lines += ["", f"mean prompt length: {ctx[0]:.0f} tokens"]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
