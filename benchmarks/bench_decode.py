"""Decode speed on one GPU: loratune's decode step eager and CUDA-graphed beside transformers `generate`, one process.

The model: a named shape (default Llama-3-8B) with random weights drawn on the device, its projections in
NF4 with double quantization through bitsandbytes (`Linear4bit` with `Params4bit` weights, as
`from_pretrained(BitsAndBytesConfig)` builds them; bf16 compute), and one LoRA adapter of rank 16 on q, k,
v, o, gate, up and down with random non-zero A and B. loratune's decoder shares those tensors
(`decoder_from_hf`); transformers runs the same model under peft with the same adapter weights.

Measured (greedy, every step's token read on the host, as a server does):
- decode tokens/s for 1 row and for 32 rows (each row --new tokens after a 32-token prompt; the key and
  batch buckets' graphs are captured in a first, untimed pass over the same lengths);
- time to first token of a 1,000-token prompt (prefill + the first token on the host; median of 3);
- transformers `generate` on the same model (fewer new tokens, --hf-new: its per-token cost is flat);
- token agreement: graphed against eager (should be all), and loratune against transformers (bf16: equal
  for most of the first tokens; random weights give near-ties that bf16 rounding may flip).

Usage (GPU machine, repo root, wheels installed as for the other benchmarks):
    python benchmarks/bench_decode.py --out-dir $OUT          # Llama-3-8B shape, about 2-3 minutes
    python benchmarks/bench_decode.py --shape tiny --device cpu   # a smoke run of the whole script
Prints a table last and writes bench_decode_<shape>.json under --out-dir.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SHAPES: dict[str, dict] = {
    "llama3-8b": dict(model_type="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                      num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, rope_theta=500000.0,
                      rms_norm_eps=1e-5, max_position_embeddings=8192, tie_word_embeddings=False),
    # a Llama-3.2-1B-like model of 4 layers: real widths, for the GPU tests of the graphed step
    "small": dict(model_type="llama", vocab_size=32000, hidden_size=2048, intermediate_size=8192,
                  num_hidden_layers=4, num_attention_heads=32, num_key_value_heads=8, head_dim=64,
                  rope_theta=500000.0, rms_norm_eps=1e-5, max_position_embeddings=4096, tie_word_embeddings=False),
    "tiny": dict(model_type="llama", vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, rope_theta=10000.0, rms_norm_eps=1e-5,
                 max_position_embeddings=2048, tie_word_embeddings=False),
}


def log(*a) -> None:
    print(*a, file=sys.stderr, flush=True)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build_models(shape: str, device: str, dtype: torch.dtype = torch.bfloat16, rank: int = 16, nf4: bool = True,
                 seed: int = 0):
    """(transformers model under peft, loratune decoder) over the same random NF4 base and LoRA weights."""
    import bitsandbytes as bnb
    from peft import LoraConfig, get_peft_model
    from torch import nn
    from transformers import AutoConfig, AutoModelForCausalLM

    from loratune.decoder import decoder_from_hf
    from loratune.model.quant import keep_standard_4bit_layout

    spec = dict(SHAPES[shape])
    config = AutoConfig.for_model(spec.pop("model_type"), **spec)
    config.eos_token_id = config.bos_token_id = config.pad_token_id = None  # random weights: never stop early
    torch.manual_seed(seed)
    with torch.device(device):
        hf = AutoModelForCausalLM.from_config(config, dtype=dtype)
    if nf4:  # each projection as bitsandbytes' Linear4bit over its Params4bit (what from_pretrained builds)
        for layer in hf.model.layers:
            for parent in (layer.self_attn, layer.mlp):
                for name, lin in list(parent.named_children()):
                    if not isinstance(lin, nn.Linear):
                        continue
                    q = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=lin.bias is not None,
                                          compute_dtype=dtype, compress_statistics=True, quant_type="nf4",
                                          device="meta")
                    q.weight = bnb.nn.Params4bit(lin.weight.data, requires_grad=False, compress_statistics=True,
                                                 quant_type="nf4").to(device)
                    if lin.bias is not None:
                        q.bias = nn.Parameter(lin.bias.data, requires_grad=False)
                    setattr(parent, name, q)
    hf.eval().requires_grad_(False)
    keep_standard_4bit_layout(hf)  # on a CPU, bitsandbytes would repack the weights its own way at the first call
    dec = decoder_from_hf(hf, attention="auto").eval()
    dec.add_adapters(rank, 2 * rank, targets=TARGETS, seed=seed)
    peft_model = get_peft_model(hf, LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules=TARGETS,
                                               bias="none", task_type="CAUSAL_LM")).eval()
    g = torch.Generator(device=device).manual_seed(seed + 1)
    modules = dict(peft_model.named_modules())
    with torch.no_grad():
        for name, layer in dec.adapted_layers().items():
            a = torch.randn(layer.lora_A.shape, generator=g, device=device) / layer.in_features ** 0.5
            b = torch.randn(layer.lora_B.shape, generator=g, device=device) * 0.02
            layer.set_adapter_weights(a, b)
            theirs = modules["base_model.model." + dec.hf_name(name)]
            theirs.lora_A["default"].weight.copy_(a)
            theirs.lora_B["default"].weight.copy_(b)
    dec.track_adapters()
    return peft_model, dec


def prompts(rows: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (length,), generator=g).tolist() for _ in range(rows)]


def ours_decode(dec, sd, prompt_rows: list[list[int]], new: int) -> tuple[float, list[list[int]]]:
    """(seconds for `new` - 1 decode steps after the prefill, greedy tokens per row) on SlotDecoder `sd`."""
    rows = list(range(len(prompt_rows)))
    sd.release(rows)
    with torch.inference_mode(), dec.frozen_adapters():
        tokens = sd.prefill(rows, prompt_rows).argmax(-1).cpu()
        out = [tokens.tolist()]
        sync(sd.device)
        start = time.perf_counter()
        for _ in range(new - 1):
            tokens = sd.step(rows, tokens).argmax(-1).cpu()  # on the host every step, as a server needs it
            out.append(tokens.tolist())
        sync(sd.device)
        seconds = time.perf_counter() - start
    return seconds, [[step[r] for step in out] for r in rows]


def hf_generate(model, prompt_rows: list[list[int]], new: int, device: torch.device) -> tuple[float, list[list[int]]]:
    ids = torch.tensor(prompt_rows, device=device)
    with torch.inference_mode():
        sync(device)
        start = time.perf_counter()
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new,
                             min_new_tokens=new, do_sample=False, pad_token_id=0)
        sync(device)
    return time.perf_counter() - start, out[:, ids.shape[1]:].tolist()


def ttft(fn, device: torch.device, reps: int = 3) -> float:
    """Median seconds of `fn()` (which returns once the first token is on the host) after one warm-up call."""
    fn()
    times = []
    for _ in range(reps):
        sync(device)
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def agreement(a: list[int], b: list[int]) -> int:
    """How many leading tokens two greedy answers share."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    from loratune.decoder.generate import SlotDecoder

    device = torch.device(args.device)
    t0 = time.perf_counter()
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    model, dec = build_models(args.shape, args.device, dtype=dtype, rank=args.rank, nf4=not args.no_nf4)
    vocab = dec.config.vocab_size
    log(f"built {args.shape} in {time.perf_counter() - t0:.0f}s")
    results: dict = {"shape": args.shape, "base": f"{'dense' if args.no_nf4 else 'NF4'} {args.dtype}", "device": torch.cuda.get_device_name(device) if device.type == "cuda"
                     else "cpu", "rank": args.rank, "new_tokens": args.new, "rows": {}}
    graphed_ok = device.type == "cuda"
    for rows in args.rows:
        p = prompts(rows, args.prompt, vocab, seed=rows)
        capacity = args.prompt + args.new + 1
        entry: dict = {}
        for name, graphs in (("eager", False), ("graphed", True)):
            if graphs and not graphed_ok:
                continue
            sd = SlotDecoder(dec, rows, capacity, graphs=graphs)
            new = args.new if graphs else min(args.new, args.eager_new)
            ours_decode(dec, sd, p, new)  # warm-up: kernels compiled, every bucket's graph captured
            seconds, toks = ours_decode(dec, sd, p, new)
            entry[name] = {"tokens_per_s": rows * (new - 1) / seconds, "step_ms": 1e3 * seconds / (new - 1),
                           "captures": sd.runner.captures}
            entry[name + "_tokens"] = toks[0][:32]
            log(f"{rows} rows {name}: {entry[name]['tokens_per_s']:.1f} tokens/s")
            del sd
        hf_generate(model, p, 2, device)  # warm-up
        seconds, toks = hf_generate(model, p, args.hf_new, device)
        entry["transformers"] = {"tokens_per_s": rows * args.hf_new / seconds}
        entry["transformers_tokens"] = toks[0][:32]
        log(f"{rows} rows transformers: {entry['transformers']['tokens_per_s']:.1f} tokens/s")
        ours = entry.get("graphed_tokens", entry["eager_tokens"])
        entry["agree_graphed_eager"] = agreement(entry.get("graphed_tokens", ours), entry["eager_tokens"])
        entry["agree_ours_transformers"] = agreement(ours, entry["transformers_tokens"])
        results["rows"][rows] = entry
    long_prompt = prompts(1, args.ttft_prompt, vocab, seed=99)
    sd = SlotDecoder(dec, 1, args.ttft_prompt + 2)

    def first_ours() -> None:
        sd.release([0])
        with torch.inference_mode(), dec.frozen_adapters():
            int(sd.prefill([0], long_prompt).argmax(-1)[0])

    ids = torch.tensor(long_prompt, device=device)

    def first_hf() -> None:
        with torch.inference_mode():
            model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=1, do_sample=False,
                           pad_token_id=0)

    results["ttft_ms"] = {"loratune": 1e3 * ttft(first_ours, device), "transformers": 1e3 * ttft(first_hf, device)}
    results["seconds"] = time.perf_counter() - t0
    print(table(results))
    if args.out_dir:
        out = Path(args.out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / f"bench_decode_{args.shape}.json").write_text(json.dumps(results, indent=1))
    return results


def table(r: dict) -> str:
    lines = [f"decode, {r['shape']} {r['base']} + LoRA r={r['rank']}, {r['device']} ({r['seconds']:.0f}s in all)",
             "| rows | loratune graphed tok/s | loratune eager tok/s | transformers tok/s | graphed = eager "
             "(leading tokens of 32) | = transformers |", "|---|---|---|---|---|---|"]
    for rows, e in r["rows"].items():
        graphed = f"{e['graphed']['tokens_per_s']:,.1f} ({e['graphed']['step_ms']:.2f} ms/step)" if "graphed" in e \
            else "n/a"
        lines.append(f"| {rows} | {graphed} | {e['eager']['tokens_per_s']:,.1f} | "
                     f"{e['transformers']['tokens_per_s']:,.1f} | {e['agree_graphed_eager']} | "
                     f"{e['agree_ours_transformers']} |")
    t = r["ttft_ms"]
    lines.append(f"time to first token, 1 prompt: loratune {t['loratune']:.1f} ms, transformers "
                 f"{t['transformers']:.1f} ms")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", default="llama3-8b", choices=list(SHAPES))
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 32], help="batch sizes to decode")
    ap.add_argument("--prompt", type=int, default=32, help="prompt tokens per row for the decode runs")
    ap.add_argument("--new", type=int, default=256, help="new tokens per row (graphed)")
    ap.add_argument("--eager-new", type=int, default=64, help="new tokens per row for the eager step")
    ap.add_argument("--hf-new", type=int, default=32, help="new tokens per row for transformers generate")
    ap.add_argument("--ttft-prompt", type=int, default=1000, help="prompt tokens for the time to first token")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--no-nf4", action="store_true", help="a dense base (no bitsandbytes)")
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"], help="compute dtype")
    ap.add_argument("--out-dir", default=None)
    return ap.parse_args(argv)


if __name__ == "__main__":
    main()
