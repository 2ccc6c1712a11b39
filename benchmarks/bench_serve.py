"""Serving speed: `loratune serve` under load from the OpenAI client, beside transformers `generate`, one run.

What it does, for one named model shape:
1. builds random bf16 weights of the shape with the offline byte-level BPE tokenizer (`loratune.model.tiny`; no
   hub), saved once like a hub checkpoint (the output rows of ids that decode to no text alone are zero, so the
   greedy answers are text and stream one piece per token, the prompts are text tokens too), and four LoRA adapters (r=16, alpha 32, every linear layer; random A
   and B) written directly as the run folders `loratune train` writes (PEFT files, tokenizer, loratune.yaml with
   the base and `--bits`, loratune_run.json), so nothing is trained;
2. for one adapter, then for four: starts `loratune serve` on them as a subprocess (127.0.0.1, a free port,
   continuous batching with `--batch-slots` = the largest concurrency, slots of prompt + answer tokens), waits for
   /health, and at each concurrency (1, 8, 32 by default) runs that many clients of the `openai` package's async
   client, each sending `--requests-per-client` streamed completions of `--prompt-tokens` prompt tokens (token ids,
   the same for every request) and `--gen-tokens` answer tokens (`ignore_eos`, greedy, usage included). With four
   adapters, request i asks for adapter i mod 4, so the running batch mixes them. An untimed warm-up round at
   the same concurrency comes first (CUDA graph captures, allocator);
3. transformers `generate` on the same weights (loaded by loratune's own `load_base`: bitsandbytes NF4 with
   `--bits 4`, as `loratune serve` loads them) with the first adapter through peft, one batch of `concurrency`
   prompts, greedy, `min_new_tokens` = `max_new_tokens` = `--gen-tokens`.

Measured per case: aggregate answer tokens/s (all answer tokens over the wall time from the first request sent
to the last answer's end), time to first token (request sent -> first streamed text) and inter-token latency
(between consecutive streamed text pieces, one per token unless a token completes no character) as p50/p90/p99
in milliseconds, and per request the time per output token after the first (TPOT: (end - first piece) /
(tokens - 1)). For transformers the times are those of `generate`'s steps, noted by a streamer (`StepClock`): the
first step's end is every row's TTFT, the gaps between steps are every row's inter-token latencies.

Usage:
    python benchmarks/bench_serve.py --shape llama3-8b --out-dir $OUT                   (GPU, NF4)
    python benchmarks/bench_serve.py --shape tiny --device cpu --concurrency 1,4 --gen-tokens 8   (smoke, CPU)
Writes bench_serve_<shape>.json and table_serve_<shape>.md under --out-dir; the server's log goes to
--work-dir/serve-<adapters>.log.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_common import SHAPES, free, log  # noqa: E402
from bench_common import build_model as build_saved  # noqa: E402

RANK, ALPHA = 16, 32.0
ADAPTERS = 4
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


# ------------------------------------------------------------------------------------------------ files


def build_model(shape: str, folder: Path, device: str) -> Path:
    """Random bf16 weights of `shape` and the offline tokenizer, saved like a hub checkpoint (once); ids that are no
    text (past the tokenizer, special, a lone byte of a character) get zero output rows, so greedy answers are text:
    streamed one piece per token, as a trained model's are."""

    def text_only(model, tokenizer) -> None:
        with torch.no_grad():
            head = model.get_output_embeddings().weight
            keep = torch.zeros(head.shape[0], dtype=torch.bool)
            keep[text_ids(tokenizer)] = True
            head[~keep.to(head.device)] = 0

    return build_saved(shape, folder, device, prepare=text_only)


def text_ids(tokenizer) -> list[int]:
    """Token ids that decode, alone, to text (not empty, no replacement character)."""
    special = set(tokenizer.all_special_ids)
    pieces = ((i, tokenizer.decode([i], skip_special_tokens=True)) for i in range(len(tokenizer)) if i not in special)
    return [i for i, text in pieces if text and "\ufffd" not in text]


def _linear_shapes(spec: dict) -> dict[str, tuple[int, int]]:
    """(in, out) of each adapted projection of one Llama block."""
    h, inter = spec["hidden_size"], spec["intermediate_size"]
    hd = spec.get("head_dim") or h // spec["num_attention_heads"]
    q, kv = spec["num_attention_heads"] * hd, spec["num_key_value_heads"] * hd
    return {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
            "gate_proj": (h, inter), "up_proj": (h, inter), "down_proj": (inter, h)}


def build_adapter(shape: str, model: Path, folder: Path, bits: int, seed: int) -> Path:
    """A run folder as `loratune train` writes it, with a random rank-16 LoRA on every linear layer (once)."""
    if (folder / "loratune.yaml").is_file():
        return folder
    from peft import LoraConfig
    from safetensors.torch import save_file
    from transformers import AutoTokenizer

    from loratune.config import Config, ModelConfig, QuantizationConfig, dump_yaml
    from loratune.data.templates import TEMPLATES
    from loratune.decoder.keys import PEFT_PREFIX
    from loratune.model.tiny import FAMILIES

    spec = SHAPES[shape]
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(spec["num_hidden_layers"]):
        for leaf, (d_in, d_out) in _linear_shapes(spec).items():
            part = "self_attn" if leaf in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
            name = f"{PEFT_PREFIX}model.layers.{layer}.{part}.{leaf}"
            tensors[f"{name}.lora_A.weight"] = torch.randn(RANK, d_in, generator=g) / d_in ** 0.5
            tensors[f"{name}.lora_B.weight"] = torch.randn(d_out, RANK, generator=g) * 0.02
    tmp = folder.with_name(folder.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=0.0, target_modules=list(TARGETS), bias="none",
               task_type="CAUSAL_LM", base_model_name_or_path=str(model)).save_pretrained(str(tmp))
    save_file(tensors, str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})
    cfg = Config(model=ModelConfig(path=str(model)), quantization=QuantizationConfig(bits=bits))
    cfg.adapter.rank, cfg.adapter.alpha, cfg.adapter.dropout = RANK, ALPHA, 0.0
    (tmp / "loratune.yaml").write_text(dump_yaml(cfg), encoding="utf-8")
    template = TEMPLATES[FAMILIES["llama"].template]
    tok = AutoTokenizer.from_pretrained(str(model))
    tok.chat_template = template.jinja
    tok.save_pretrained(str(tmp))
    run = {"template": {"name": template.name, "stop": template.stop}, "versions": {"torch": torch.__version__}}
    (tmp / "loratune_run.json").write_text(json.dumps(run, indent=2), encoding="utf-8")
    tmp.replace(folder)
    return folder


# ------------------------------------------------------------------------------------------------ server


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def served(adapters: list[Path], slots: int, slot_tokens: int, logfile: Path, timeout: float) -> Iterator[str]:
    """`loratune serve` on `adapters` (named a0, a1, ...) in a subprocess; yields its base URL; stopped after."""
    import httpx

    port = free_port()
    cmd = [sys.executable, "-m", "loratune", "serve", *[f"a{i}={p}" for i, p in enumerate(adapters)],
           "--port", str(port), "--batch-slots", str(slots), "--slot-tokens", str(slot_tokens),
           "--max-pending", str(4 * slots), "--max-tokens", str(slot_tokens)]
    env = {**os.environ, "LORATUNE_API_KEY": ""}
    with open(logfile, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=str(ROOT))
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + timeout
        while True:
            if proc.poll() is not None:
                raise SystemExit(f"loratune serve exited with {proc.returncode}:\n{logfile.read_text()[-3000:]}")
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.time() > deadline:
                raise SystemExit(f"loratune serve did not answer /health within {timeout:.0f}s (log: {logfile})")
            time.sleep(0.5)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


async def _one(client, model: str, prompt: list[int], gen: int) -> dict:
    """One streamed completion: its TTFT, gaps between text pieces and token count (from the usage chunk)."""
    sent = time.perf_counter()
    stamps: list[float] = []
    tokens = None
    stream = await client.completions.create(model=model, prompt=prompt, max_tokens=gen, temperature=0, stream=True,
                                             stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].text:
            stamps.append(time.perf_counter())
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
    end = time.perf_counter()
    first = stamps[0] if stamps else end
    return {"ttft": first - sent, "gaps": [b - a for a, b in zip(stamps, stamps[1:])], "tokens": tokens,
            "tpot": (end - first) / (tokens - 1) if tokens and tokens > 1 else None}


async def load(url: str, models: list[str], concurrency: int, per_client: int, prompt: list[int], gen: int) -> dict:
    """`concurrency` clients, each sending `per_client` requests one after another; request i asks for
    models[i % len(models)]."""
    import openai

    client = openai.AsyncOpenAI(api_key="none", base_url=url + "/v1", max_retries=0, timeout=3600)
    results: list[dict] = []

    async def worker(c: int) -> None:
        for k in range(per_client):
            i = c * per_client + k
            results.append(await _one(client, models[i % len(models)], prompt, gen))

    start = time.perf_counter()
    await asyncio.gather(*(worker(c) for c in range(concurrency)))
    wall = time.perf_counter() - start
    await client.close()
    return summarize([r["tokens"] for r in results], wall, [r["ttft"] for r in results],
                     [g for r in results for g in r["gaps"]], [r["tpot"] for r in results if r["tpot"] is not None])


def percentiles(values: list[float]) -> dict:
    """p50/p90/p99 in milliseconds (nearest rank), and the count."""
    if not values:
        return {"p50": None, "p90": None, "p99": None, "n": 0}
    s = sorted(values)
    pick = [s[min(len(s) - 1, max(0, round(q / 100 * len(s) + 0.5) - 1))] for q in (50, 90, 99)]
    return {"p50": pick[0] * 1e3, "p90": pick[1] * 1e3, "p99": pick[2] * 1e3, "n": len(s)}


def summarize(tokens: list[int | None], wall: float, ttfts: list[float], gaps: list[float],
              tpots: list[float]) -> dict:
    total = sum(t or 0 for t in tokens)
    return {"requests": len(tokens), "completion_tokens": total, "tokens_per_request": tokens, "seconds": wall,
            "tokens_per_s": total / wall, "ttft_ms": percentiles(ttfts), "itl_ms": percentiles(gaps),
            "tpot_ms": percentiles(tpots)}


# ------------------------------------------------------------------------------------------------ transformers


def run_transformers(model_dir: Path, adapter: Path, bits: int, device: str, concurrency: int, prompt: list[int],
                     gen: int) -> dict:
    """transformers `generate` on the weights as loratune loads them, the first adapter through peft."""
    from peft import PeftModel

    from loratune.config import Config, ModelConfig, QuantizationConfig
    from loratune.model.load import load_base

    cfg = Config(model=ModelConfig(path=str(model_dir)), quantization=QuantizationConfig(bits=bits))
    base = load_base(cfg)
    if device == "cuda" and bits in (16, 32):
        base = base.to("cuda")
    model = PeftModel.from_pretrained(base, str(adapter)).eval()
    dev = next(model.parameters()).device
    ids = torch.tensor([prompt] * concurrency, device=dev)
    mask = torch.ones_like(ids)
    pad = model.config.eos_token_id

    def generate(n: int, model=model) -> tuple[float, list[float]]:
        clock = StepClock()
        sync(device)
        clock.start = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n,
                                 do_sample=False, pad_token_id=pad, streamer=clock)
        sync(device)
        assert out.shape == (concurrency, len(prompt) + n), out.shape
        return time.perf_counter() - clock.start, clock.stamps

    generate(min(gen, 4))  # warm-up
    total, stamps = generate(gen)
    gaps = [b - a for a, b in zip(stamps, stamps[1:])]
    tpot = (stamps[-1] - stamps[0]) / max(gen - 1, 1)
    result = summarize([gen] * concurrency, total, [stamps[0]] * concurrency, gaps * concurrency,
                       [tpot] * concurrency)
    del model, base
    free()
    return result


class StepClock:
    """A `generate` streamer that notes when each step's new tokens arrive (times from `start`); transformers calls
    `put` with the prompt first, then with every step's tokens (copied to the host: the step is done)."""

    def __init__(self) -> None:
        self.start = 0.0
        self.stamps: list[float] = []
        self._prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self._prompt_seen:
            self._prompt_seen = True
            return
        self.stamps.append(time.perf_counter() - self.start)

    def end(self) -> None:
        pass


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


# ------------------------------------------------------------------------------------------------ main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shape", default="llama3-8b", choices=sorted(SHAPES))
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cuda", "cpu"])
    p.add_argument("--bits", type=int, default=None, choices=[4, 16, 32],
                   help="base precision (default: 4, NF4 as QLoRA, on cuda; 32 on cpu)")
    p.add_argument("--concurrency", default="1,8,32", help="comma-separated client counts")
    p.add_argument("--adapters", default="1,4", help="comma-separated adapter counts served (1 and/or 4)")
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--gen-tokens", type=int, default=256)
    p.add_argument("--requests-per-client", type=int, default=2)
    p.add_argument("--paths", default="serve,transformers", help="comma-separated: serve, transformers")
    p.add_argument("--startup-timeout", type=float, default=1800.0, help="seconds to wait for the server's /health")
    p.add_argument("--work-dir", default="/tmp/bench-serve", help="where the model and adapters go (kept)")
    p.add_argument("--out-dir", default="bench-out")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    bits = args.bits or (4 if args.device == "cuda" else 32)
    levels = [int(x) for x in args.concurrency.split(",") if x.strip()]
    counts = [int(x) for x in args.adapters.split(",") if x.strip()]
    paths = [x.strip() for x in args.paths.split(",") if x.strip()]
    if set(paths) - {"serve", "transformers"} or set(counts) - {1, ADAPTERS} or not levels or min(levels) < 1:
        raise SystemExit(f"--paths: serve, transformers; --adapters: 1 and/or {ADAPTERS}; --concurrency: >= 1")
    work, out = Path(args.work_dir), Path(args.out_dir)
    work.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    model = build_model(args.shape, work / f"model-{args.shape}", args.device)
    adapters = [build_adapter(args.shape, model, work / f"adapter-{args.shape}-{bits}bit-{i}", bits, seed=i)
                for i in range(ADAPTERS)]
    from transformers import AutoTokenizer

    words = text_ids(AutoTokenizer.from_pretrained(str(model)))
    prompt = [words[(7 + 31 * i) % len(words)] for i in range(args.prompt_tokens)]  # text tokens, fixed
    slot_tokens = args.prompt_tokens + args.gen_tokens + 8
    cases: list[dict] = []
    if "serve" in paths:
        for count in counts:
            names = [f"a{i}" for i in range(count)]
            logfile = work / f"serve-{count}.log"
            t = time.time()
            with served(adapters[:count], max(levels), slot_tokens, logfile, args.startup_timeout) as url:
                log(f"loratune serve with {count} adapter(s) up in {time.time() - t:.0f}s")
                for c in levels:
                    asyncio.run(load(url, names, c, 1, prompt, min(args.gen_tokens, 8)))  # warm-up, untimed
                    r = asyncio.run(load(url, names, c, args.requests_per_client, prompt, args.gen_tokens))
                    cases.append({"path": "loratune serve", "adapters": count, "concurrency": c, **r})
                    log(f"serve, {count} adapter(s), concurrency {c}: {r['tokens_per_s']:.1f} tokens/s, TTFT p50 "
                        f"{r['ttft_ms']['p50']:.1f} ms, ITL p50 {_ms(r['itl_ms']['p50'])} ms")
    if "transformers" in paths:
        for c in levels:
            r = run_transformers(model, adapters[0], bits, args.device, c, prompt, args.gen_tokens)
            cases.append({"path": "transformers generate", "adapters": 1, "concurrency": c, **r})
            log(f"transformers, concurrency {c}: {r['tokens_per_s']:.1f} tokens/s")
    device = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    report = {"shape": args.shape, "bits": bits, "device": device, "prompt_tokens": args.prompt_tokens,
              "gen_tokens": args.gen_tokens, "requests_per_client": args.requests_per_client, "rank": RANK,
              "cases": cases, "versions": {"torch": torch.__version__, **_versions()}}
    (out / f"bench_serve_{args.shape}.json").write_text(json.dumps(report, indent=2))
    table = render(report)
    (out / f"table_serve_{args.shape}.md").write_text(table)
    print(table, flush=True)
    return report


def _ms(x: float | None) -> str:
    return "-" if x is None else f"{x:.1f}"


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for name in ("transformers", "bitsandbytes", "peft", "openai", "loratune"):
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = "-"
    return found


def render(report: dict) -> str:
    lines = [f"{report['shape']} ({report['bits']}-bit base, LoRA r={report['rank']}) on {report['device']}: prompts "
             f"of {report['prompt_tokens']} tokens, answers of {report['gen_tokens']}", "",
             "| path | adapters | concurrency | tokens/s | TTFT p50 / p90 / p99 ms | ITL p50 / p90 / p99 ms | "
             "TPOT p50 ms |", "|---|---|---|---|---|---|---|"]
    for c in report["cases"]:
        t, i = c["ttft_ms"], c["itl_ms"]
        lines.append(f"| {c['path']} | {c['adapters']} | {c['concurrency']} | {c['tokens_per_s']:.1f} | "
                     f"{_ms(t['p50'])} / {_ms(t['p90'])} / {_ms(t['p99'])} | "
                     f"{_ms(i['p50'])} / {_ms(i['p90'])} / {_ms(i['p99'])} | {_ms(c['tpot_ms']['p50'])} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
