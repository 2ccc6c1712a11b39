"""What is alive at the memory peak of a training step: eager micro-batches against the CUDA graph capture.

The graphed 2 x 2048 step of the Llama-3-8B shape peaks ~0.35 GiB above the eager one (runs 9 and 11,
docs/benchmarks.md); the planner carries that as a fitted term. This script finds out what those bytes are.
It builds a variant as bench_train.py does (`load_variant`, default `decoder`: loratune's decoder, whose
fixed-shape streams are graphed; the transformers fallback is never graphed since issue 12), steps it with the
training loop (`variant_loop`), records the CUDA caching allocator's history
(`torch.cuda.memory._record_memory_history`, Python stacks), runs two eager steps, then the steps in which
`GraphedMicroBatch` captures and replays, and replays the allocator's event trace on the host: for each
phase it reports the moment of the highest allocated total, and the allocations alive then (made after
recording started: weights and other long-lived tensors are the baseline), grouped by the innermost frame
in loratune, peft or transformers code. Prints text only (nothing pickled leaves the machine).

Usage (GPU machine, wheels installed as in benchmarks/gpu_run.sh):
    python benchmarks/memory_peak.py --shape llama3-8b --case 2x2048 [--variant decoder-eager]
"""

from __future__ import annotations

import argparse
import collections
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import bench_train as bench  # noqa: E402

OURS = ("loratune/", "peft/", "transformers/", "torch/utils/checkpoint", "torch/autograd", "benchmarks/")


def where(frames: list[dict]) -> str:
    """The innermost frame in code we can act on (stacks are innermost first)."""
    for f in frames:
        name = f.get("filename", "")
        if any(k in name for k in OURS):
            short = name.split("site-packages/")[-1].split("src/")[-1]
            return f"{short}:{f.get('line')} {f.get('name')}"
    return "(other)" if not frames else f"{frames[0].get('filename', '?').split('/')[-1]}:{frames[0].get('line')}"


def peak_of(events: list[dict], start: int, end: int, live: dict[int, tuple[int, str]], allocated: int
            ) -> tuple[int, dict[int, tuple[int, str]], int]:
    """Replay events[start:end] onto `live` (addr -> (bytes, site), updated in place) starting from `allocated`
    bytes: (the highest allocated total, the allocations alive at that moment, the allocated total at the end)."""
    best, best_live, pending = allocated, dict(live), False
    for e in events[start:end]:
        if e["action"] == "alloc":
            live[e["addr"]] = (e["size"], where(e.get("frames", [])))
            allocated += e["size"]
            if allocated > best:
                best, pending = allocated, True
        elif e["action"] == "free_completed":
            if pending:  # the first free after a new peak: what is alive now is what was alive at the peak
                best_live, pending = dict(live), False
            allocated -= live.pop(e["addr"], (e["size"], ""))[0]
    if pending:
        best_live = dict(live)
    return best, best_live, allocated


def show(title: str, peak: int, base: int, live: dict[int, tuple[int, str]], top: int = 18) -> None:
    groups: dict[str, list[int]] = collections.defaultdict(list)
    for size, site in live.values():
        groups[site].append(size)
    print(f"\n== {title}: peak {peak / 2**30:.3f} GiB allocated ({(peak - base) / 2**30:.3f} GiB above the "
          f"baseline), {len(live)} live allocations made since recording began, {sum(s for s, _ in live.values()) / 2**30:.3f} GiB")
    for site, sizes in sorted(groups.items(), key=lambda kv: -sum(kv[1]))[:top]:
        print(f"   {sum(sizes) / 2**20:9.1f} MiB in {len(sizes):4d} x (largest {max(sizes) / 2**20:7.1f} MiB)  {site}")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="llama3-8b", choices=sorted(bench.SHAPES))
    p.add_argument("--case", default="2x2048")
    p.add_argument("--model-dir", default="/tmp/loratune-bench")
    p.add_argument("--variant", default="decoder", choices=sorted(bench.VARIANTS))
    args = p.parse_args(argv)
    bench.ARGS = bench.parse_args(["--shape", args.shape, "--device", "cuda", "--model-dir", args.model_dir])
    folder = Path(bench.ARGS.model_dir) / args.shape
    bench.build_and_save(args.shape, folder)
    from loratune.train.loop import LoopState

    case = bench.parse_case(args.case)
    v = bench.load_variant(folder, args.variant, case)
    loop, windows = bench.variant_loop(v, case, bench.batches(case, 6, bench.SHAPES[args.shape]["vocab_size"]))
    state = LoopState()
    loop.step(state, windows[0])  # optimizer state exists before recording: it is baseline, not step memory
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.memory._record_memory_history(enabled="all", context="alloc", stacks="python", max_entries=2_000_000)
    torch.cuda.reset_peak_memory_stats()
    marks = []
    for i, w in enumerate(windows[1:]):  # graphs: step 2 eager (timed), step 3 capture + timed replay, then replays
        loop.step(state, w)
        torch.cuda.synchronize()
        graphs = loop.graphs
        how = "captured" if graphs is not None and graphs.key is not None else "eager"
        title = f"step {i + 2} ({how}, max_memory_allocated {torch.cuda.max_memory_allocated() / 2**30:.3f} GiB)"
        marks.append((title, len(torch.cuda.memory._snapshot()["device_traces"][0])))
        torch.cuda.reset_peak_memory_stats()
    events = torch.cuda.memory._snapshot()["device_traces"][0]
    torch.cuda.memory._record_memory_history(enabled=None)
    print(f"baseline (weights, adapters, optimizer state, grads) {base / 2**30:.3f} GiB; {len(events)} allocator events")
    live: dict[int, tuple[int, str]] = {}
    allocated, start = base, 0
    for title, end in marks:
        peak, at_peak, allocated = peak_of(events, start, end, live, allocated)
        show(title, peak, base, at_peak)
        start = end


if __name__ == "__main__":
    main()
