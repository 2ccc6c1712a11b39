"""LoftQ's effect on a model with real (trained) weights: the first-step loss of a 4-bit QLoRA run with
`adapter.init loftq` against plain LoRA on the same 4-bit base, and against the unquantized model.

No real checkpoint is reachable offline, so the model is pretrained here: loratune's demo Llama shape (4 layers,
hidden 256, 1k-token BPE vocabulary) trained in full (fp32, AdamW) on the bundled tiny corpus and the example
conversations rendered with its chat template, for `--seconds` seconds on the CPU. Then `loratune train` runs
one optimizer step for each setting, on examples/data/quickstart.jsonl (seen in pretraining) and on held-out
conversations (the rejected answers of examples/data/preference.jsonl); the reported number is that step's
loss (metrics.jsonl's first row), i.e. the loss of the model the adapter starts from.

    python benchmarks/loftq_first_step.py --seconds 180 --out /tmp/loftq-bench
"""

from __future__ import annotations

import argparse
import json
import time
from importlib import resources
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).parents[1]
DATA = ROOT / "examples" / "data"


def corpus_texts(tokenizer) -> list[str]:
    """The tiny corpus's lines and every example conversation rendered with the model's chat template."""
    text = resources.files("loratune.model").joinpath("tiny_corpus.txt").read_text(encoding="utf-8")
    texts = [line for line in text.splitlines() if line and not line.startswith("#")]
    for line in (DATA / "quickstart.jsonl").read_text(encoding="utf-8").splitlines():
        texts.append(tokenizer.apply_chat_template(json.loads(line)["messages"], tokenize=False))
    for line in (DATA / "preference.jsonl").read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        texts += [str(row.get("prompt", "")) + " " + str(row.get("chosen", ""))]
    return texts


def pretrain(folder: Path, out: Path, seconds: float, seed: int = 0) -> dict:
    """Train the demo model in full on the corpus for `seconds`; save it (safetensors + tokenizer) to `out`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(seed)
    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    ids = [i for t in corpus_texts(tok) for i in tok(t).input_ids + [tok.eos_token_id]]
    stream = torch.tensor(ids)
    seq, batch = 64, 8
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.0)
    model.train()
    start, step, losses = time.perf_counter(), 0, []
    while time.perf_counter() - start < seconds:
        starts = torch.randint(0, stream.numel() - seq - 1, (batch,))
        x = torch.stack([stream[s:s + seq] for s in starts])
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        step += 1
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    for f in ("generation_config.json",):
        if (folder / f).is_file() and not (out / f).is_file():
            (out / f).write_text((folder / f).read_text())
    return {"tokens": len(ids), "steps": step, "first_loss": losses[0], "last_loss": sum(losses[-10:]) / 10}


def held_out(out: Path) -> Path:
    """Conversations the pretraining never saw: the rejected answers of examples/data/preference.jsonl."""
    rows = []
    for line in (DATA / "preference.jsonl").read_text(encoding="utf-8").splitlines():
        r = json.loads(line)
        if isinstance(r.get("prompt"), str) and isinstance(r.get("rejected"), str):
            rows.append({"messages": [{"role": "user", "content": r["prompt"]},
                                      {"role": "assistant", "content": r["rejected"]}]})
    path = out / "held_out.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def first_step_loss(model: Path, work: Path, name: str, overrides: dict, data: Path) -> float:
    """`loratune train` for one step on `data`; the loss metrics.jsonl reports for it."""
    from loratune.cli import main

    cfg = {"model": {"path": str(model)},
           "adapter": {"rank": 16, "alpha": 16, "dropout": 0.0},
           "data": {"datasets": [{"path": str(data)}], "max_length": 256},
           "train": {"max_steps": 1, "batch_size": 32, "grad_accum": 1, "lr": 1e-4, "log_every": 1,
                     "plot": False, "save_every": 0, "optimizer": "adamw", "seed": 0},
           "output": {"dir": str(work / name), "overwrite": True}}
    for key, value in overrides.items():
        section, leaf = key.split(".")
        cfg.setdefault(section, {})[leaf] = value
    path = work / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    if main(["train", str(path)]) != 0:
        raise SystemExit(f"the {name} run failed")
    rows = [json.loads(x) for x in (work / name / "metrics.jsonl").read_text().splitlines()]
    return next(r["loss"] for r in rows if r.get("loss") is not None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=180.0, help="pretraining time")
    parser.add_argument("--out", type=Path, default=Path("/tmp/loftq-bench"))
    parser.add_argument("--model", type=Path, default=None,
                        help="a pretrained checkpoint folder (safetensors) to measure instead of pretraining one")
    args = parser.parse_args()
    from loratune.model.load import resolve_model_path

    args.out.mkdir(parents=True, exist_ok=True)
    model = args.model or args.out / "pretrained"
    done = args.out / "pretraining.json"
    if args.model is not None:
        facts = {"model": str(args.model)}
    elif done.is_file() and (model / "config.json").is_file():  # pretrained already: reuse it
        facts = json.loads(done.read_text())
    else:
        facts = pretrain(Path(resolve_model_path("demo://llama")), model, args.seconds)
        done.write_text(json.dumps(facts))
    print("pretrained:", facts, flush=True)
    results: dict = {"pretraining": facts}
    sets = {"quickstart (pretrained on)": DATA / "quickstart.jsonl", "held-out answers": held_out(args.out)}
    for name, overrides in [("fp32 base (reference)", {"quantization.bits": 32}),
                            ("4-bit NF4 + LoRA (default init)", {"quantization.bits": 4}),
                            ("4-bit NF4 + LoRA (loftq init)", {"quantization.bits": 4, "adapter.init": "loftq"}),
                            ("4-bit NF4 + LoRA r=64 (loftq init)", {"quantization.bits": 4, "adapter.init": "loftq",
                                                                    "adapter.rank": 64, "adapter.alpha": 64})]:
        for data_name, data in sets.items():
            tag = (name.split(" (")[0].replace(" ", "_").replace("+", "") + "_"
                   + str(overrides.get("adapter.init", "default")) + "_" + data.stem)
            loss = first_step_loss(model, args.out, tag, overrides, data)
            results.setdefault(name, {})[data_name] = loss
            print(f"{name}, {data_name}: first-step loss {loss:.4f}", flush=True)
    (args.out / "results.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
