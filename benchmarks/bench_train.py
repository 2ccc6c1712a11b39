"""Training throughput and memory on one GPU: the QLoRA reference path against loratune's, in one process.

What it does, for one named model shape (random bf16 weights, saved once to a folder and loaded back
through `from_pretrained`, as users load real checkpoints):
1. reference: what qlora.py does. `from_pretrained(BitsAndBytesConfig(nf4, double quant, bf16
   compute))`, `prepare_model_for_kbit_training` (non-reentrant checkpointing), `get_peft_model`, a
   plain loop with torch AdamW and the model's own (HF) loss.
2. loratune variants, each built as `loratune train` builds it (`loratune.model.resolve.decide` ->
   `loratune.model.build.build_trainable` -> `loratune.train.run.make_runner`) and stepped by the training
   loop itself (`loratune.train.loop.Loop.step`, one micro-batch per step), so the benchmark runs the same
   micro-batch runner interface (eager or graphed) as training and copies none of it (see VARIANTS):
   `decoder` is loratune's own decoder on padding-free streams (the default of `loratune train`, CUDA graphs
   where they apply), `decoder-eager` the same without graphs, `decoder-plain` without loratune's Triton kernels
   (model.kernels false: their plain-PyTorch references), `hf` the transformers + peft fallback as the libraries
   ship it (padded batches, eager, no kernel of loratune inside the model; only the loss is loratune's, from the
   final hidden states and the head's weight).
Every run of a case sees the same random batches and starts from LoRA B = 0 (the first loss of every path is the
base model's), and each variant's LoRA weights are restored before each case: the table reports the largest
relative difference to the reference over the first `--steps` losses (A is drawn by each path's own seed).

Timing: each step is synchronised; tokens/s is batch tokens over the median step time after
`--warmup` steps. Peak memory is `torch.cuda.max_memory_allocated` during the case (weights included).
The FLOP bound follows ../shared/gpu/README.md: forward 2N + input gradients 2N + recompute 2N_layers
(with checkpointing) + 4 causal attention passes of 2*S*H*L per token, at 790 TFLOP/s.

Usage (on the GPU machine, after installing the wheels; see benchmarks/gpu_run.sh):
    python benchmarks/bench_train.py --shape llama3-8b --out-dir $OUT
Prints one table last and writes bench_<shape>.json and a log under --out-dir.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import gc
import json
import math
import os
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
PEAK_TFLOPS = 790.0  # bf16 dense matmul measured on the H100 (../shared/gpu/README.md)
SEED = 1234

SHAPES: dict[str, dict] = {
    "llama3-8b": dict(model_type="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                      num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, rope_theta=500000.0,
                      rms_norm_eps=1e-5, max_position_embeddings=32768, tie_word_embeddings=False),
    "llama3.2-1b": dict(model_type="llama", vocab_size=128256, hidden_size=2048, intermediate_size=8192,
                        num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8, head_dim=64,
                        rope_theta=500000.0, rms_norm_eps=1e-5, max_position_embeddings=32768,
                        tie_word_embeddings=True),
    # a few-MB Llama for a CPU smoke run of this script (`--device cpu`), not for numbers
    "tiny": dict(model_type="llama", vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, rope_theta=10000.0, rms_norm_eps=1e-5,
                 max_position_embeddings=2048, tie_word_embeddings=False),
    "qwen2.5-7b": dict(model_type="qwen2", vocab_size=152064, hidden_size=3584, intermediate_size=18944,
                       num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4, rope_theta=1000000.0,
                       rms_norm_eps=1e-6, max_position_embeddings=32768, tie_word_embeddings=False),
}

# name -> config overrides of the variant (on top of loratune_config's); each is built the way `loratune train`
# builds it and stepped by its loop (loratune.train.loop.Loop).
VARIANTS: dict[str, list[str]] = {
    "decoder": ["model.implementation=loratune"],  # the default of `loratune train`: our decoder, padding-free
    "decoder-eager": ["model.implementation=loratune", "model.cuda_graphs=false"],
    "decoder-plain": ["model.implementation=loratune", "model.kernels=false"],  # plain-PyTorch kernel references
    "hf": ["model.implementation=transformers", "train.batching=padded"],  # stock transformers + peft, eager
}


def on_cuda() -> bool:
    return ARGS.device == "cuda"


def sync() -> None:
    if on_cuda():
        torch.cuda.synchronize()


def log(*a) -> None:
    print(f"[{time.strftime('%H:%M:%S')}]", *a, flush=True)


# ------------------------------------------------------------------------------------------ model


def flops_per_token(shape: dict, seq: int, rank: int, checkpointing: bool = True) -> float:
    h, i, L = shape["hidden_size"], shape["intermediate_size"], shape["num_hidden_layers"]
    hd = shape.get("head_dim", h // shape["num_attention_heads"])
    q, kv = shape["num_attention_heads"] * hd, shape["num_key_value_heads"] * hd
    per_layer = h * q + 2 * h * kv + q * h + 3 * h * i
    n_layers = per_layer * L
    n = n_layers + shape["vocab_size"] * h
    lora = rank * L * ((h + q) + 2 * (h + kv) + (q + h) + 2 * (h + i) + (i + h))
    attn = 2 * seq * q * L  # per pass, causal: half of QK^T and PV (4 * S * q per layer)
    passes = 4 if checkpointing else 3  # forward (+ recompute) + backward counted twice
    recompute = 2 * n_layers if checkpointing else 0
    return 2 * n + 2 * n + recompute + passes * attn + passes * 2 * lora


def build_and_save(name: str, folder: Path) -> None:
    """Random bf16 weights of the named shape, built on the GPU and saved like a hub checkpoint (once)."""
    if (folder / "config.json").is_file():
        log(f"reusing {folder}")
        return
    from transformers import AutoConfig, AutoModelForCausalLM

    spec = dict(SHAPES[name])
    config = AutoConfig.for_model(spec.pop("model_type"), **spec)
    torch.manual_seed(0)
    t = time.time()
    with torch.device(ARGS.device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    tmp = folder.with_name(folder.name + ".tmp")
    model.save_pretrained(tmp, max_shard_size="4GB")
    tmp.replace(folder)
    free(model)
    log(f"built and saved {name} in {time.time() - t:.0f}s")


def load_reference(path: Path):
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_use_double_quant=True, bnb_4bit_quant_type="nf4",
                             bnb_4bit_compute_dtype=torch.bfloat16)
    model = AutoModelForCausalLM.from_pretrained(path, quantization_config=bnb, dtype=torch.bfloat16,
                                                 device_map={"": 0 if on_cuda() else "cpu"},
                                                 attn_implementation="sdpa")
    model.config.use_cache = False
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True,
                                            gradient_checkpointing_kwargs={"use_reentrant": False})
    torch.manual_seed(SEED)
    lcfg = LoraConfig(r=ARGS.rank, lora_alpha=ARGS.alpha, lora_dropout=0.0, target_modules=TARGETS, bias="none",
                      task_type="CAUSAL_LM")
    return get_peft_model(model, lcfg)


CFG_OVERRIDES: list[str] = []


def loratune_config(path: Path):
    from loratune.config import load_config

    CFG_OVERRIDES[:] = ["quantization.bits=4", "quantization.compute_dtype=bf16", f"adapter.rank={ARGS.rank}",
                        f"adapter.alpha={ARGS.alpha}", "adapter.dropout=0.0",
                        f"adapter.target_modules=[{','.join(TARGETS)}]", "train.gradient_checkpointing=true",
                        "train.optimizer=adamw", f"train.lr={ARGS.lr}", "train.scheduler=constant",
                        "train.warmup_ratio=0", f"train.max_grad_norm={ARGS.clip}"]
    return load_config(None, [f"model.path={path}"] + CFG_OVERRIDES)


# ------------------------------------------------------------------------------------------- loop


# A step function takes (model, ids, optimizer) and returns the step's mean token loss (a tensor).


def reference_step(model, ids, opt, autocast: bool = False) -> torch.Tensor:
    """qlora.py's loop, written plainly: the model's own HF loss, backward, AdamW step (no clipping)."""
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss.detach()


@dataclass
class Variant:
    """One loratune variant as `loratune train` builds it: the trained model, its runner and the run's decisions."""

    name: str
    cfg: object
    resolved: object
    model: object  # loratune.model.build.TrainModel
    accelerator: object


def load_variant(path: Path, name: str, case: tuple[int, int]) -> Variant:
    """decide -> build_trainable, as `loratune.train.run.Run` does, for micro-batches of `case`'s tokens."""
    from loratune.config import load_config
    from loratune.model.build import build_trainable
    from loratune.model.memory import load_model_config
    from loratune.model.resolve import decide
    from loratune.train.run import make_accelerator

    b, s = case
    loratune_config(path)  # fills CFG_OVERRIDES
    cfg = load_config(None, [f"model.path={path}", *CFG_OVERRIDES, *VARIANTS[name], f"train.batch_size={b}",
                             "train.grad_accum=1", f"data.max_length={s}"])
    resolved = decide(cfg, ARGS.device, load_model_config(cfg))
    torch.manual_seed(SEED)
    model = build_trainable(cfg, resolved)
    return Variant(name, cfg, resolved, model, make_accelerator(resolved))


def variant_loop(v: Variant, case: tuple[int, int], ids: list[torch.Tensor]):
    """The training loop over `ids` (one micro-batch per optimizer step), with a fresh optimizer: (loop, windows)."""
    from loratune.data.collate import Batching
    from loratune.data.sample import Sample
    from loratune.train.loop import Loop
    from loratune.train.optim import build_optimizer
    from loratune.train.run import make_runner

    b, s = case
    runner, optimizer = make_runner(v.model, build_optimizer(v.model.module, v.cfg.train), v.cfg, v.accelerator)
    samples = [Sample(row.tolist(), row.tolist()) for batch in ids for row in batch]
    padding_free = v.resolved.padding_free
    loop = Loop(runner, samples, v.cfg.train, optimizer, v.accelerator, Batching(padding_free, b, b * s, pad_id=0))
    return loop, [[list(range(i * b, (i + 1) * b))] for i in range(len(ids))]


def run_variant_case(v: Variant, case: tuple[int, int], steps: int, warmup: int, vocab: int,
                     init: dict[str, torch.Tensor]) -> CaseResult:
    """`steps` optimizer steps of the loop on `case`'s random batches; times, losses and the peak."""
    from loratune.train.loop import LoopState

    b, s = case
    res = CaseResult(v.name, f"{b}x{s}", b * s)
    module = v.model.module
    with torch.no_grad():
        for n, p in module.named_parameters():
            if p.requires_grad:
                p.copy_(init[n])
    free()
    if on_cuda():
        torch.cuda.reset_peak_memory_stats()
    loop = None
    try:
        loop, windows = variant_loop(v, case, batches(case, steps, vocab))
        state = LoopState()
        for w in windows:
            sync()
            t = time.perf_counter()
            r = loop.step(state, w)
            sync()
            res.step_times.append(time.perf_counter() - t)
            res.losses.append(r.loss)
    except torch.OutOfMemoryError as e:
        res.error = "OOM: " + str(e).splitlines()[0][:120]
    res.finish(warmup)
    replays = loop.graphs.replays if loop is not None and loop.graphs is not None else 0
    del loop
    for p in module.parameters():
        p.grad = None
    log(f"{v.name:18s} {res.case:8s} {res.tokens_per_s:9.0f} tok/s  peak {res.peak_gib:6.2f} GiB  "
        f"graph replays {replays}  losses {[round(x, 4) for x in res.losses[:3]]}...{res.error or ''}")
    return res


@dataclass
class CaseResult:
    path: str
    case: str
    tokens: int
    step_s: float = math.nan
    tokens_per_s: float = math.nan
    peak_gib: float = math.nan
    reserved_gib: float = math.nan
    losses: list[float] = field(default_factory=list)
    step_times: list[float] = field(default_factory=list)
    gc_ms: list[float] = field(default_factory=list)  # time in Python garbage collection per step
    error: str | None = None
    planned_gib: float = math.nan  # loratune.model.memory's estimate of peak_gib (loratune variants)

    def finish(self, warmup: int) -> None:
        """The case's peaks (CUDA) and its median step after `warmup` steps, once its steps are done."""
        if on_cuda():
            self.peak_gib = torch.cuda.max_memory_allocated() / 2**30
            self.reserved_gib = torch.cuda.max_memory_reserved() / 2**30
        timed = self.step_times[warmup:]
        if timed:
            self.step_s = statistics.median(timed)
            self.tokens_per_s = self.tokens / self.step_s


def batches(case: tuple[int, int], n: int, vocab: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(SEED + case[0] * 100003 + case[1])
    return [torch.randint(0, vocab, case, generator=g) for _ in range(n)]


class GcTimer:
    """Time spent in Python's garbage collector (gc.callbacks), read and reset per step."""

    def __init__(self) -> None:
        self.total, self._t = 0.0, 0.0
        gc.callbacks.append(self)

    def __call__(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._t = time.perf_counter()
        else:
            self.total += time.perf_counter() - self._t

    def take(self) -> float:
        t, self.total = self.total, 0.0
        return t


GC_TIMER = GcTimer()


def run_case(model, step_fn, make_opt, name: str, case: tuple[int, int], steps: int, warmup: int, vocab: int,
             init: dict[str, torch.Tensor], manual_gc: bool = False) -> CaseResult:
    b, s = case
    res = CaseResult(name, f"{b}x{s}", b * s)
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(init[n])
    opt = make_opt(model)
    model.train()
    free()
    if on_cuda():
        torch.cuda.reset_peak_memory_stats()
    if manual_gc:
        gc.freeze()
        gc.disable()
    GC_TIMER.take()
    try:
        for ids in batches(case, steps, vocab):
            ids = ids.to(ARGS.device, non_blocking=True)
            sync()
            t = time.perf_counter()
            loss = step_fn(model, ids, opt)
            sync()
            res.step_times.append(time.perf_counter() - t)
            res.gc_ms.append(1e3 * GC_TIMER.take())
            res.losses.append(loss.item())
    except torch.OutOfMemoryError as e:
        res.error = "OOM: " + str(e).splitlines()[0][:120]
    finally:
        if manual_gc:
            gc.enable()
            gc.unfreeze()
    res.finish(warmup)
    del opt
    for p in params.values():
        p.grad = None
    log(f"{name:18s} {res.case:8s} {res.tokens_per_s:9.0f} tok/s  peak {res.peak_gib:6.2f} GiB  "
        f"gc {sum(res.gc_ms):.0f} ms  losses {[round(x, 4) for x in res.losses[:3]]}...{res.error or ''}")
    return res


def profile_step(model, step_fn, make_opt, name: str, case: tuple[int, int], vocab: int, out_dir: Path) -> None:
    from torch.profiler import ProfilerActivity, profile

    ids = batches(case, 1, vocab)[0].to(ARGS.device)
    opt = make_opt(model)
    for _ in range(4):  # warm; a graphed variant captures this shape at its third step (loratune.kernels.graphs)
        step_fn(model, ids, opt)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        step_fn(model, ids, opt)
        sync()
    del opt
    events = prof.key_averages()
    for key in (["cuda_time_total", "self_cpu_time_total"] if on_cuda() else ["cpu_time_total"]):
        table = events.table(sort_by=key, row_limit=40, max_name_column_width=80)
        log(f"profile of one {case[0]}x{case[1]} step of {name} (sorted by {key}):\n{table}")
    if on_cuda():  # GPU busy time: the sum of kernel durations (kernels do not overlap on one stream)
        kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
        busy = sum(e.time_range.elapsed_us() for e in kernels)
        log(f"{name}: GPU kernel time in the profiled step {busy / 1e3:.1f} ms over {len(kernels)} kernels")


def planned_gib(v: Variant, folder: Path, case: tuple[int, int]) -> float:
    """`loratune plan`'s estimate of this case's peak for the variant's decisions (nan on error)."""
    try:
        from transformers import AutoConfig

        from loratune.model.memory import plan_for

        b, s = case
        return plan_for(v.cfg, AutoConfig.from_pretrained(folder), v.resolved.with_batch(b, b * s)).total_gib
    except Exception as e:  # the planner must never cost a benchmark run
        log(f"memory plan failed: {e!r}")
        return math.nan


def profile_variant(v: Variant, case: tuple[int, int], vocab: int) -> None:
    """A torch profile of one loop step after four warm ones (a graphed variant captures at its third)."""
    from torch.profiler import ProfilerActivity, profile

    from loratune.train.loop import LoopState

    loop, windows = variant_loop(v, case, batches(case, 1, vocab) * 5)
    state = LoopState()
    for w in windows[:4]:
        loop.step(state, w)
    sync()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        loop.step(state, windows[4])
        sync()
    del loop
    events = prof.key_averages()
    for key in (["cuda_time_total", "self_cpu_time_total"] if on_cuda() else ["cpu_time_total"]):
        table = events.table(sort_by=key, row_limit=30, max_name_column_width=80)
        log(f"profile of one {case[0]}x{case[1]} step of {v.name} (sorted by {key}):\n{table}")
    if on_cuda():
        kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
        busy = sum(e.time_range.elapsed_us() for e in kernels)
        log(f"{v.name}: GPU kernel time in the profiled step {busy / 1e3:.1f} ms over {len(kernels)} kernels")


def snapshot(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def lora_checksum(init: dict[str, torch.Tensor]) -> float:
    return float(sum(t.double().abs().sum() for n, t in init.items() if "lora_A" in n))


def free(*objs) -> None:
    del objs
    gc.collect()
    if on_cuda():
        torch.cuda.empty_cache()


# ------------------------------------------------------------------------------------------ report


def parse_case(text: str) -> tuple[int, int]:
    b, s = text.lower().split("x")
    return int(b), int(s)


def table(results: list[CaseResult], shape: dict) -> str:
    ref = {r.case: r for r in results if r.path == "reference"}
    lines = ["| path | case | tokens/s | step s median (min-max) | peak GiB | % of FLOP bound | tok/s vs ref | "
             "memory vs ref | max rel. loss diff vs ref (first N) | planned GiB (planned / peak) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        seq = int(r.case.split("x")[1])
        bound = PEAK_TFLOPS * 1e12 / flops_per_token(shape, seq, ARGS.rank)
        rr = ref.get(r.case)
        speed = r.tokens_per_s / rr.tokens_per_s if rr and rr.tokens_per_s == rr.tokens_per_s else math.nan
        mem = r.peak_gib / rr.peak_gib if rr else math.nan
        diff = "-"
        if rr and r.path != "reference" and rr.losses and r.losses:
            n = min(len(rr.losses), len(r.losses))
            diff = f"{max(abs(a - b) / abs(b) for a, b in zip(r.losses[:n], rr.losses[:n])):.1e} (n={n})"
        timed = r.step_times[ARGS.warmup:] or [math.nan]
        spread = f"{r.step_s:.3f} ({min(timed):.3f}-{max(timed):.3f})"
        plan = f"{r.planned_gib:.2f} ({r.planned_gib / r.peak_gib:.2f}x)" if r.planned_gib == r.planned_gib else "-"
        lines.append(f"| {r.path} | {r.case} | {r.tokens_per_s:,.0f} | {spread} | {r.peak_gib:.2f} | "
                     f"{100 * r.tokens_per_s / bound:.1f}% | {speed:.2f}x | {100 * mem:.0f}% | {diff} | {plan} |"
                     + (f" {r.error}" if r.error else ""))
    return "\n".join(lines)


def versions() -> dict[str, str]:
    out = {"python": sys.version.split()[0]}
    for mod in ("torch", "transformers", "peft", "bitsandbytes", "triton", "liger_kernel", "accelerate"):
        try:
            m = __import__(mod)
            out[mod] = getattr(m, "__version__", "?")
        except ImportError:
            out[mod] = "missing"
    if out.get("liger_kernel") == "?":
        from importlib.metadata import version

        out["liger_kernel"] = version("liger-kernel")
    return out


def matmul_tflops() -> float:
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    times = []
    for _ in range(10):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        a @ b
        e.record()
        e.synchronize()
        times.append(s.elapsed_time(e) / 1e3)
    return 2 * 8192**3 / statistics.median(times) / 1e12


# -------------------------------------------------------------------------------------------- main


def main() -> None:
    out_dir = Path(ARGS.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    shape = SHAPES[ARGS.shape]
    folder = Path(ARGS.model_dir) / ARGS.shape
    cases = [parse_case(c) for c in ARGS.cases.split(",")]
    standard = cases[0]
    env = versions() | {"date": datetime.date.today().isoformat()}
    if on_cuda():
        env |= {"gpu": torch.cuda.get_device_name(), "matmul_tflops": round(matmul_tflops(), 1)}
    log("env", env)
    build_and_save(ARGS.shape, folder)
    results: list[CaseResult] = []
    checksums: dict[str, float] = {}

    def write_report() -> None:  # after every case, so a run cut short still leaves its numbers
        report = {"shape": ARGS.shape, "args": vars(ARGS), "env": env, "lora_A_checksums": checksums,
                  "results": [r.__dict__ for r in results]}
        (out_dir / f"bench_{ARGS.shape}.json").write_text(json.dumps(report, indent=1))
        (out_dir / f"table_{ARGS.shape}.md").write_text(table(results, shape) + "\n")

    vocab = shape["vocab_size"]

    def steps_for(case):
        return ARGS.steps if case == standard else ARGS.long_steps

    def ref_opt(model):
        return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=ARGS.lr)

    refs = [p for p in ARGS.paths.split(",") if p not in ("", "none")]
    if refs:
        t = time.time()
        model = load_reference(folder)
        log(f"reference loaded in {time.time() - t:.0f}s")
        init = snapshot(model)
        checksums["reference"] = lora_checksum(init)
        for case in cases:
            results.append(run_case(model, reference_step, ref_opt, "reference", case, steps_for(case),
                                    ARGS.warmup, vocab, init))
            write_report()
        if "reference" in ARGS.profile.split(","):
            profile_step(model, reference_step, ref_opt, "reference", standard, vocab, out_dir)
        if "reference-autocast" in refs:  # qlora.py's HF Trainer runs with bf16 autocast
            step = functools.partial(reference_step, autocast=True)
            results.append(run_case(model, step, ref_opt, "reference-autocast", standard, ARGS.steps,
                                    ARGS.warmup, vocab, init))
        free(model, init)
    for name in [v for v in ARGS.variants.split(",") if v]:
        t = time.time()
        v = load_variant(folder, name, standard)
        log(f"{name} loaded in {time.time() - t:.0f}s: {v.resolved.describe()}")
        init = snapshot(v.model.module)
        checksums[name] = lora_checksum(init)
        for case in cases:
            results.append(run_variant_case(v, case, steps_for(case), ARGS.warmup, vocab, init))
            results[-1].planned_gib = planned_gib(v, folder, case)
            write_report()
        if name in ARGS.profile.split(","):
            profile_variant(v, standard, vocab)
        del v, init
        free()
    write_report()
    print(f"\n## {ARGS.shape}: r={ARGS.rank} alpha={ARGS.alpha} on {','.join(TARGETS)}, checkpointing, "
          f"median of {ARGS.steps}-{ARGS.warmup} (standard) / {ARGS.long_steps}-{ARGS.warmup} steps")
    print(f"env: {env}\nLoRA-A checksums: {checksums}\n")
    print(table(results, shape), flush=True)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="llama3-8b", choices=sorted(SHAPES))
    p.add_argument("--cases", default="2x2048,1x8192,1x16384", help="BxS cases; the first is the standard one")
    p.add_argument("--paths", default="reference,reference-autocast",
                   help="reference paths: 'reference' (plain loop as qlora.py), 'reference-autocast' (the same under "
                        "bf16 autocast, as qlora.py's Trainer runs it; standard case only); '' to skip")
    p.add_argument("--variants", default="decoder,hf", help=f"loratune variants in order: {', '.join(VARIANTS)}")
    p.add_argument("--steps", type=int, default=20, help="steps of the standard case (losses compared)")
    p.add_argument("--long-steps", type=int, default=5, help="steps of the other cases")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--alpha", type=float, default=32.0)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--clip", type=float, default=0.0, help="loratune's train.max_grad_norm (the reference never clips)")
    p.add_argument("--profile", default="", help="comma list of paths/variants to profile one step of")
    p.add_argument("--device", default="cuda", help="cuda; cpu only to smoke-test this script (shape tiny)")
    p.add_argument("--model-dir", default="/tmp/loratune-bench")
    p.add_argument("--out-dir", default=os.environ.get("OUT", "bench-out"))
    return p.parse_args(argv)


ARGS = parse_args([]) if __name__ != "__main__" else None

if __name__ == "__main__":
    ARGS = parse_args()
    main()
