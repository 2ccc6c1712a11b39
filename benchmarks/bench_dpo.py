"""DPO on one GPU: `loratune train` (train.method dpo) against TRL's DPOTrainer, tokens/s and peak memory (issue 14).

The workload (fixed seed): a model of the named shape (bench_sft.py's SHAPES: random bf16 weights saved with the
real Llama-3.1 tokenizer, given with --tokenizer) and `--n` preference pairs whose prompts and answers are random
one-token words (bench_sft.py's), of log-normal lengths (prompt median 300 tokens, each answer median 700), each
side (prompt + answer) cut to fit `--max-length` tokens with the chat template: pairs of 2 x ~1k tokens. QLoRA
(NF4, double quantization, bf16 compute), LoRA r=16, alpha 32, dropout 0 on all seven projections, beta 0.1,
8 pairs per optimizer step, lr 5e-6, one epoch; the reference policy is the base with the adapter disabled on
both paths (TRL's default for a peft model), computed in each step.

Paths (each in its own process):
    default   `python -m loratune.cli train` with train.method=dpo: padding-free micro-batches (batch_size 4, the
              budget of 4 pairs of max_length per side), grad_accum 2
    padded    the same with train.batching=padded
    NAME:K=V;K=V  another loratune path with these overrides
    trl       transformers + peft + bitsandbytes + TRL's DPOTrainer: batch 4, accumulation 2, gradient
              checkpointing, paged AdamW 32-bit, the same schedule and clipping

Reported per path: wall time of training (loading excluded), tokens/s over the pairs' real tokens (prompt + answer
of both sides, as both paths compute them; this script's own count, the same for every path), peak allocated GiB,
and the per-step losses. Goal of the issue: loratune at least 3x TRL's tokens/s at at most half its memory.

Usage (GPU machine, wheels installed, see benchmarks/gpu_run.sh):
    python benchmarks/bench_dpo.py --tokenizer tok/ --out-dir $OUT
CPU smoke run: --device cpu --shape tiny --n 8 --prompt-median 12 --reply-median 16 --max-length 96
Writes dpo_<shape>.json and dpo_<shape>.md under --out-dir and prints the table last.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from bench_sft import (
    SHAPES,
    TARGETS,
    TOKENIZER_FILES,
    last_line,
    lengths,
    log,
    one_token_words,
    versions,
)


def build_model(args: argparse.Namespace, work: Path) -> Path:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    model_dir = work / f"model-{args.shape}"
    if not (model_dir / "config.json").is_file():
        spec = dict(SHAPES[args.shape])
        config = AutoConfig.for_model(spec.pop("model_type"), **spec)
        torch.manual_seed(0)
        with torch.device(args.device):
            model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
        tmp = model_dir.with_name(model_dir.name + ".tmp")
        model.save_pretrained(tmp, max_shard_size="4GB")
        del model
        for f in TOKENIZER_FILES:
            shutil.copy(Path(args.tokenizer) / f, tmp / f)
        tmp.replace(model_dir)
    return model_dir


def pairs(words: list[str], args: argparse.Namespace, budget: int) -> list[dict]:
    """`--n` pairs of random words: a prompt and two answers, prompt + each answer at most `budget` words."""
    rng = np.random.default_rng(args.seed)
    p_len = lengths(rng, args.n, args.prompt_median, 0.6)
    c_len, r_len = lengths(rng, args.n, args.reply_median, 0.5), lengths(rng, args.n, args.reply_median, 0.5)

    def text(k: int) -> str:
        return " ".join(words[i] for i in rng.integers(0, len(words), k))

    out = []
    for p, c, r in zip(p_len, c_len, r_len):
        p = max(1, min(p, budget // 3))
        c, r = max(1, min(c, budget - p)), max(1, min(r, budget - p))
        out.append({"prompt": [{"role": "user", "content": text(p)}],
                    "chosen": [{"role": "assistant", "content": text(c)}],
                    "rejected": [{"role": "assistant", "content": text(r)}]})
    return out


def write_workload(args: argparse.Namespace, work: Path) -> tuple[Path, Path, int]:
    """(model folder, pairs file, real tokens of one epoch: both sides' prompt + answer)."""
    from transformers import AutoTokenizer

    model_dir = build_model(args, work)
    tok = AutoTokenizer.from_pretrained(model_dir)

    def chat(m: list[dict]) -> int:
        return len(tok.apply_chat_template(m, tokenize=True, return_dict=False))

    overhead = chat([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]) - 2
    data = pairs(one_token_words(model_dir / "tokenizer.json"), args, args.max_length - overhead - 4)
    path = work / f"dpo-{args.n}.jsonl"
    path.write_text("".join(json.dumps(p) + "\n" for p in data))
    real = sum(chat(p["prompt"] + p[side]) for p in data for side in ("chosen", "rejected"))
    log(f"{len(data)} pairs, {real:,} tokens (both sides), {real / (2 * len(data)):.0f} per sequence")
    return model_dir, path, real


def run_loratune(args: argparse.Namespace, model_dir: Path, data: Path, work: Path, path: str, real: int) -> dict:
    name, _, extra = path.partition(":")
    out = work / f"run-{name}"
    shutil.rmtree(out, ignore_errors=True)
    cfg_file = work / "empty.yaml"
    cfg_file.write_text("{}\n")
    o = [f"model.path={model_dir}", f"data.datasets=[{{path: {data}}}]", f"data.max_length={args.max_length}",
         "data.cache=false", "adapter.rank=16", "adapter.alpha=32", "adapter.dropout=0",
         f"adapter.target_modules=[{','.join(TARGETS)}]", "train.method=dpo", "train.lr=5e-6", "train.epochs=1",
         "train.batch_size=4", "train.grad_accum=2", "train.log_every=1", f"output.dir={out}",
         "output.overwrite=true", "train.resume=off"]
    if name == "padded":
        o.append("train.batching=padded")
    o += [x for x in extra.split(";") if x] + (["model.implementation=loratune"] if args.device == "cpu" else [])
    visible = "" if args.device == "cpu" else os.environ.get("CUDA_VISIBLE_DEVICES", "0")
    env = dict(os.environ, CUDA_VISIBLE_DEVICES=visible)
    proc = subprocess.run([sys.executable, "-m", "loratune.cli", "train", str(cfg_file), *o], env=env,
                          capture_output=True, text=True, timeout=args.path_timeout)
    (Path(args.out_dir) / f"dpo_{name}.log").write_text(proc.stdout + "\n--- stderr\n" + proc.stderr)
    if proc.returncode != 0:
        raise RuntimeError(f"loratune train ({path}) exited {proc.returncode}: {last_line(proc.stderr)}")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    rows = [r for r in rows if "loss" in r and "step" in r]
    record = json.loads((out / "loratune_run.json").read_text())
    facts = record.get("extra", record)
    seconds = float(facts["seconds"])
    counted = sum(int(r["step_input_tokens"]) for r in rows)
    return {"path": name, "seconds": seconds, "real_tokens": real, "loop_tokens": counted, "steps": len(rows),
            "tokens_per_s": real / seconds, "peak_gib": max(float(r["memory_gib"]) for r in rows),
            "losses": [float(r["loss"]) for r in rows], "accuracy": [r.get("accuracy") for r in rows]}


def trl_main(args: argparse.Namespace) -> None:
    """TRL's DPOTrainer in this (child) process; writes its result as JSON to --result."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig
    from trl import DPOConfig, DPOTrainer

    cuda = args.device == "cuda"
    tok = AutoTokenizer.from_pretrained(args.model)
    ds = Dataset.from_list([json.loads(line) for line in Path(args.data).read_text().splitlines()])
    kw: dict = {"dtype": torch.bfloat16 if cuda else torch.float32}
    if cuda:
        kw |= {"quantization_config": BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_use_double_quant=True,
                                                        bnb_4bit_quant_type="nf4",
                                                        bnb_4bit_compute_dtype=torch.bfloat16),
               "device_map": {"": 0}}
    model = AutoModelForCausalLM.from_pretrained(args.model, attn_implementation="sdpa", **kw)
    lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=TARGETS, bias="none",
                      task_type="CAUSAL_LM")
    config = DPOConfig(output_dir=str(Path(args.result).parent / "trl-out"), per_device_train_batch_size=4,
                       gradient_accumulation_steps=2, learning_rate=5e-6, num_train_epochs=1, beta=0.1,
                       lr_scheduler_type="constant_with_warmup", warmup_steps=0.03, max_grad_norm=0.3,
                       optim="paged_adamw_32bit" if cuda else "adamw_torch", bf16=cuda, gradient_checkpointing=True,
                       gradient_checkpointing_kwargs={"use_reentrant": False}, max_length=args.max_length,
                       logging_steps=1, save_strategy="no", report_to=[], seed=args.seed, data_seed=args.seed,
                       dataloader_num_workers=0, use_cpu=not cuda)
    trainer = DPOTrainer(model=model, args=config, train_dataset=ds, processing_class=tok, peft_config=lora)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    t = time.time()
    trainer.train()
    seconds = time.time() - t
    peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan")
    hist = [h for h in trainer.state.log_history if "loss" in h]
    Path(args.result).write_text(json.dumps({
        "path": "trl", "seconds": seconds, "steps": trainer.state.global_step, "peak_gib": peak,
        "losses": [float(h["loss"]) for h in hist],
        "accuracy": [h.get("rewards/accuracies") for h in hist]}))


def run_trl(args: argparse.Namespace, model_dir: Path, data: Path, work: Path, real: int) -> dict:
    result = work / "trl.json"
    result.unlink(missing_ok=True)
    cmd = [sys.executable, __file__, "--trl-child", "--model", str(model_dir), "--data", str(data),
           "--result", str(result), "--device", args.device, "--max-length", str(args.max_length),
           "--seed", str(args.seed)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.path_timeout)
    (Path(args.out_dir) / "dpo_trl.log").write_text(proc.stdout + "\n--- stderr\n" + proc.stderr)
    if proc.returncode != 0:
        raise RuntimeError(f"TRL path exited {proc.returncode}: {last_line(proc.stderr)}")
    r = json.loads(result.read_text())
    return r | {"real_tokens": real, "tokens_per_s": real / r["seconds"]}


def table(results: list[dict]) -> str:
    ref = next((r for r in results if r["path"] == "trl" and "error" not in r), None)
    lines = ["| path | wall s (training) | tokens | tok/s | vs TRL tok/s | peak GiB | vs TRL memory | steps | "
             "first loss | last loss |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['path']} | error: {r['error'][:200]} |||||||||")
            continue
        speed = f"{r['tokens_per_s'] / ref['tokens_per_s']:.2f}x" if ref else "-"
        mem = f"{r['peak_gib'] / ref['peak_gib']:.2f}x" if ref and math.isfinite(ref["peak_gib"]) else "-"
        lines.append(f"| {r['path']} | {r['seconds']:.1f} | {r['real_tokens']:,} | {r['tokens_per_s']:,.0f} | "
                     f"{speed} | {r['peak_gib']:.2f} | {mem} | {r['steps']} | {r['losses'][0]:.4f} | "
                     f"{r['losses'][-1]:.4f} |")
    return "\n".join(lines)


def main(args: argparse.Namespace) -> None:
    out_dir, work = Path(args.out_dir), Path(args.work_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    env = versions()
    if args.device == "cuda":
        import torch

        env["gpu"] = torch.cuda.get_device_name()
    log("env", env)
    model_dir, data, real = write_workload(args, work)
    results: list[dict] = []

    def write() -> str:
        (out_dir / f"dpo_{args.shape}.json").write_text(json.dumps({"args": vars(args), "env": env,
                                                                    "results": results}, indent=1))
        text = table(results)
        (out_dir / f"dpo_{args.shape}.md").write_text(text + "\n")
        return text

    for path in [p for p in args.paths.split(",") if p]:
        log(f"path {path} ...")
        try:
            r = (run_trl(args, model_dir, data, work, real) if path == "trl"
                 else run_loratune(args, model_dir, data, work, path, real))
        except Exception as e:  # one path failing must not cost the others' numbers
            r = {"path": path, "error": f"{type(e).__name__}: {e}"}
        results.append(r)
        log(f"{path}: " + (r.get("error") or f"{r['tokens_per_s']:,.0f} tok/s, {r['seconds']:.1f}s, "
                                             f"peak {r['peak_gib']:.2f} GiB, {r['steps']} steps"))
        write()
    print(f"\n## DPO, {args.shape}: {args.n} pairs of up to 2 x {args.max_length} tokens\nenv: {env}\n")
    print(write(), flush=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="llama3-8b", choices=sorted(SHAPES))
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    p.add_argument("--tokenizer", default=".tok", help="folder holding tokenizer.json and tokenizer_config.json")
    p.add_argument("--paths", default="default,trl")
    p.add_argument("--n", type=int, default=96, help="pairs")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--prompt-median", type=float, default=300.0)
    p.add_argument("--reply-median", type=float, default=700.0)
    p.add_argument("--max-length", type=int, default=1024, help="tokens of one side (prompt + answer)")
    p.add_argument("--path-timeout", type=int, default=900, help="seconds per path")
    p.add_argument("--work-dir", default="/tmp/loratune-dpo")
    p.add_argument("--out-dir", default=os.environ.get("OUT", "bench-out"))
    p.add_argument("--trl-child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    p.add_argument("--data", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    return p.parse_args(argv)


if __name__ == "__main__":
    ARGS = parse_args()
    trl_main(ARGS) if ARGS.trl_child else main(ARGS)
