"""Where does the GPU wait? A timeline of one training step, eager and replayed as a CUDA graph.

Run 9 (docs/benchmarks.md) measured a graphed 2 x 2048 step of the Llama-3-8B shape at 420 ms; run 10 traced it
(but with the model left in eval mode, so without activation checkpointing: fixed since). This script builds each
variant as bench_train.py does (`bench_train.load_variant`: the way `loratune train` builds it), runs a few steps
of the training loop on it (`bench_train.variant_loop`: `loratune.train.loop.Loop.step`), then records one step
of each with the PyTorch profiler and reports, from
the GPU timeline: the step's wall time, the sum of kernel times, and the largest idle gaps between
consecutive GPU activities with what ran before and after each. The chrome traces go to $OUT (gzip).

Usage (GPU machine, wheels installed as in benchmarks/gpu_run.sh):
    python benchmarks/trace_step.py --shape llama3-8b --case 2x2048 --out-dir $OUT
Variants (--variants, bench_train.VARIANTS): decoder (loratune's decoder, the default: CUDA graphs where they
apply), eager (the decoder without graphs: bench_train's decoder-eager), hf (the transformers + peft fallback as
the libraries ship it: bench_train's hf).
"""

from __future__ import annotations

import argparse
import gzip
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import bench_train as bench  # noqa: E402  (the benchmark's model, config and step, unchanged)


@dataclass(frozen=True)
class Activity:
    start_us: float
    end_us: float
    name: str


def idle_gaps(activities: list[Activity], min_us: float = 5.0) -> list[tuple[float, Activity, Activity]]:
    """(gap, before, after) for every stretch of at least `min_us` in which no GPU activity runs, largest first.

    Activities may overlap (several streams); a gap is time covered by none of them.
    """
    acts = sorted(activities, key=lambda a: a.start_us)
    gaps: list[tuple[float, Activity, Activity]] = []
    covered_until, last = None, None
    for a in acts:
        if covered_until is not None and a.start_us - covered_until >= min_us:
            gaps.append((a.start_us - covered_until, last, a))
        if covered_until is None or a.end_us > covered_until:
            covered_until, last = a.end_us, a
    return sorted(gaps, key=lambda g: -g[0])


def gpu_activities(prof) -> list[Activity]:
    out = []
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            out.append(Activity(e.time_range.start, e.time_range.end, e.name))
    return out


def report(name: str, prof, wall_s: float, out_dir: Path, top: int = 15) -> None:
    acts = gpu_activities(prof)
    busy = sum(a.end_us - a.start_us for a in acts)
    gaps = idle_gaps(acts)
    span = (max(a.end_us for a in acts) - min(a.start_us for a in acts)) if acts else 0.0  # none on CPU
    print(f"\n== {name}: step {wall_s * 1e3:.1f} ms wall, {len(acts)} GPU activities, {busy / 1e3:.1f} ms busy, "
          f"first-to-last {span / 1e3:.1f} ms, idle inside {sum(g for g, _, _ in gaps) / 1e3:.1f} ms "
          f"in {len(gaps)} gaps >= 5 us")
    for size in (5, 20, 100, 1000, 10000):
        n = sum(1 for g, _, _ in gaps if g >= size)
        print(f"   gaps >= {size:>5} us: {n:5d}, {sum(g for g, _, _ in gaps if g >= size) / 1e3:8.1f} ms")
    for g, before, after in gaps[:top]:
        print(f"   {g / 1e3:8.2f} ms idle after {before.name[:60]!r} before {after.name[:60]!r}")
    path = out_dir / f"trace_{name}.json"
    prof.export_chrome_trace(str(path))
    with open(path, "rb") as src, gzip.open(str(path) + ".gz", "wb") as dst:
        shutil.copyfileobj(src, dst)
    path.unlink()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="llama3-8b", choices=sorted(bench.SHAPES))
    p.add_argument("--case", default="2x2048")
    p.add_argument("--variants", default="decoder,eager,hf", help="comma list of decoder, eager, hf")
    p.add_argument("--steps", type=int, default=5, help="steps before the traced one (capture happens in these)")
    p.add_argument("--out-dir", default=os.environ.get("OUT", "trace-out"))
    p.add_argument("--device", default="cuda", help="cuda; cpu only to smoke-test this script (shape tiny)")
    p.add_argument("--model-dir", default="/tmp/loratune-bench")
    args = p.parse_args(argv)
    bench.ARGS = bench.parse_args(["--shape", args.shape, "--device", args.device, "--model-dir", args.model_dir])
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    folder = Path(bench.ARGS.model_dir) / args.shape
    bench.build_and_save(args.shape, folder)
    from loratune.train.loop import LoopState

    case = bench.parse_case(args.case)
    ids = bench.batches(case, args.steps + 1, bench.SHAPES[args.shape]["vocab_size"])
    activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA]
                                                          if args.device == "cuda" else [])
    for name in args.variants.split(","):
        v = bench.load_variant(folder, VARIANTS[name], case)
        loop, windows = bench.variant_loop(v, case, ids)
        state = LoopState()
        for w in windows[:-1]:
            loop.step(state, w)
        bench.sync()
        with torch.profiler.profile(activities=activities) as prof:
            t = time.perf_counter()
            loop.step(state, windows[-1])
            bench.sync()
            wall = time.perf_counter() - t
        report(name, prof, wall, out)
        graphs = loop.graphs
        print(f"   graph replays: {graphs.replays if graphs is not None else 0}, "
              f"captured: {graphs is not None and graphs.key is not None}")
        del loop, v
        bench.free()


VARIANTS = {"decoder": "decoder", "eager": "decoder-eager", "hf": "hf"}  # trace name -> bench_train variant


if __name__ == "__main__":
    main()
