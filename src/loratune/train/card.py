"""The model card (`README.md`) of a run folder: what was trained, on what, how, with what result, how to load it.

peft's `save_pretrained` writes a template card ("[More Information Needed]", `base_model` pointing into
the local model cache). `run_folder.save_run` writes this one after it, in its place. Every figure comes
from the run itself: the config as the user wrote it (`model.path` as given, so a `demo://` name stays
one and a hub id stays a hub id), the adapter peft built (its real target modules), the base's real
weight precision, the data pipeline's counts, the run's own record (steps, tokens, time, the reported
train loss of `metrics.Window`, eval loss), `samples.json` and the library versions.

The YAML front matter is what the Hugging Face hub reads: `base_model` only when `model.path` is a hub
id (a local folder or a demo model is no hub reference), `library_name: peft` (`transformers` for a
full fine-tune, which saves a whole model), `pipeline_tag` and `tags`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from loratune.config import Config
from loratune.data.stats import DataStats
from loratune.model.adapters import DTYPE_NAMES, count_parameters, weight_precision
from loratune.model.build import TrainModel
from loratune.model.load import DEMO_SCHEME
from loratune.model.quant import resolve_compute_dtype
from loratune.train.metrics import span_text

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")
_TORCH_NAMES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


@dataclass
class ModelFacts:
    """What the card says about the model itself (`model_facts` reads it from the live model)."""

    precision: str  # weight_precision(model)
    targets: list[str]  # modules with adapters (empty for a full fine-tune)
    trainable: int
    parameters: int


@dataclass
class CardFacts:
    """What the card reports besides the config: gathered by the run from its live objects and record."""

    model: ModelFacts
    data: DataStats
    run: dict  # the run's facts (Run._facts): steps, tokens, seconds, losses, eval
    versions: dict[str, str]
    samples: list[dict] = field(default_factory=list)  # samples.json's entries
    plot: bool = False  # loss.png is in the folder
    checkpoint_of: int | None = None  # a checkpoint's card: the run's planned total steps


def is_hub_id(path: str) -> bool:
    """True for `org/name` (or a bare `name`) that is not a local folder or file, nor a demo model."""
    return not path.startswith(DEMO_SCHEME) and _HUB_ID.match(path) is not None and not Path(path).exists()


def model_facts(model: TrainModel) -> ModelFacts:
    """Precision, adapted modules and parameter counts of the model being trained."""
    trainable, total = count_parameters(model.module)
    return ModelFacts(weight_precision(model.module), model.adapted_modules(), trainable, total)


def render(cfg: Config, facts: CardFacts) -> str:
    """The whole README.md."""
    sections = [_front_matter(cfg), _title(cfg, facts), _method(cfg, facts), _data(cfg, facts.data),
                _training(cfg, facts.run), _results(cfg, facts), _samples(facts.samples), _usage(cfg),
                _versions(facts.versions)]
    return "\n".join(s for s in sections if s)


# ------------------------------------------------------------------------------------------- sections


def _full(cfg: Config) -> bool:
    return cfg.adapter.type in ("none", "freeze")  # the whole model is written


def _compute(cfg: Config) -> str:
    """The compute dtype training used ('bf16', 'fp16', 'fp32'): `auto` resolved on this machine, as training did."""
    return DTYPE_NAMES[resolve_compute_dtype(cfg.quantization.compute_dtype)]


def _front_matter(cfg: Config) -> str:
    path, hub = cfg.model.path, is_hub_id(cfg.model.path)
    tags = ["loratune", "text-generation"]
    if not _full(cfg):
        tags += ["lora"] + (["qlora"] if cfg.quantization.bits == 4 and cfg.quantization.method == "bitsandbytes" else [])
        tags += ["hqq"] if cfg.quantization.method == "hqq" and cfg.quantization.bits <= 8 else []
        if hub:
            tags.append(f"base_model:adapter:{path}")
    elif hub:
        tags.append(f"base_model:finetune:{path}")
    meta: dict = {"base_model": path} if hub else {}
    meta.update({"library_name": "transformers" if _full(cfg) else "peft", "pipeline_tag": "text-generation",
                 "tags": tags})
    return "---\n" + yaml.safe_dump(meta, sort_keys=False, allow_unicode=True) + "---\n"


def _title(cfg: Config, f: CardFacts) -> str:
    name = Path(cfg.output.dir).name or cfg.output.dir
    what = "A full fine-tune" if _full(cfg) else "A LoRA adapter"
    status = (f"\nThis is the checkpoint of step {f.run.get('steps')} of {f.checkpoint_of}, saved while training; "
              "the run's output folder is the one that holds `checkpoints/`.\n" if f.checkpoint_of is not None else "")
    return f"# {name}\n\n{what} for `{cfg.model.path}`, trained with loratune.\n{status}"


def _method(cfg: Config, f: CardFacts) -> str:
    q, a = cfg.quantization, cfg.adapter
    lines = ["## Method", ""]
    base = f"- Base model: `{cfg.model.path}`" + (f" (revision `{cfg.model.revision}`)" if cfg.model.revision else "")
    if cfg.model.path.startswith(DEMO_SCHEME):
        base += ", loratune's built-in demo model (random weights, built offline from a fixed seed)"
    lines.append(base)
    if _full(cfg):
        lines.append(f"- Full fine-tuning: every weight trained, weights in {f.model.precision}")
    else:
        qlora = "QLoRA: " if q.bits == 4 and q.method == "bitsandbytes" else ""
        lines.append(f"- {qlora}frozen base weights in {f.model.precision}, computing in {_compute(cfg)}"
                     + (" (quantization.compute_dtype auto)" if q.compute_dtype == "auto" else ""))
        scale = a.alpha / (a.rank ** 0.5 if a.rslora else a.rank)
        extras = ", ".join(x for x in ("rsLoRA" if a.rslora else "", "DoRA" if a.dora else "") if x)
        lines.append(f"- LoRA: rank {a.rank}, alpha {a.alpha:g} (update scale {scale:g}), dropout {a.dropout:g}"
                     + (f", {extras}" if extras else ""))
        lines.append(f"- Adapted modules: {', '.join(f'`{t}`' for t in f.model.targets)}")
        if a.modules_to_save:
            lines.append(f"- Trained in full and saved with the adapter: {', '.join(a.modules_to_save)}")
    share = 100 * f.model.trainable / max(f.model.parameters, 1)
    lines.append(f"- Trainable parameters: {f.model.trainable:,} of {f.model.parameters:,} ({share:.3f}%)")
    return "\n".join(lines) + "\n"


def _data(cfg: Config, stats: DataStats) -> str:
    d = cfg.data
    lines = ["## Data", "", "| dataset | format | records | samples | held out for eval | in the training mix |",
             "|---|---|---:|---:|---:|---:|"]
    for s in stats.datasets:
        lines.append(f"| `{s.path}` | {s.format} | {s.records:,} | {s.samples:,} | {s.eval:,} | {s.mixed:,} |")
    for s in stats.eval_datasets:
        lines.append(f"| `{s.path}` (eval) | {s.format} | {s.records:,} | {s.samples:,} | {s.samples:,} | 0 |")
    variables = getattr(d, "template_variables", None)
    lines += ["", f"- Chat template: `{stats.template or d.template}`"
              + (f" with {', '.join(f'{k}={v!r}' for k, v in variables.items())}" if variables else "")
              + f"; loss on: {_loss_on(cfg)}; max length {d.max_length} tokens" + ("; packed" if d.pack else ""),
              f"- Training set: {stats.train_samples:,} samples in {stats.rows:,} rows, {stats.tokens:,} tokens, "
              f"{stats.supervised:,} of them supervised ({100 * stats.supervised_fraction:.1f}%)",
              f"- Eval set: {stats.eval_samples:,} samples"]
    return "\n".join(lines) + "\n"


CODES = {"loratune": "loratune's decoder", "transformers": "transformers + peft"}


def _unit(cfg: Config) -> str:
    """What the loss is normalised by (loratune.pref.objective): supervised tokens, pairs or completions."""
    method = getattr(cfg.train, "method", "sft")
    return {"sft": "supervised tokens", "kto": "completions"}.get(method, "pairs")


def _loss_on(cfg: Config) -> str:
    method = getattr(cfg.train, "method", "sft")
    return f"{cfg.data.train_on} tokens" if method == "sft" else "the answers of each pair (or completion)"


def _objective(cfg: Config) -> str:
    """A preference run's method and options, as the card's training table shows them."""
    t, p = cfg.train, cfg.preference
    if t.method == "rm":
        return "reward model (scalar head, pairwise loss)"
    from loratune.pref.objective import DEFAULT_BETA

    beta = DEFAULT_BETA.get(t.method) if p.beta == "auto" else p.beta
    parts = [t.method + (f" ({p.loss})" if t.method == "dpo" else ""), f"beta {beta:g}"]
    if p.label_smoothing:
        parts.append(f"label smoothing {p.label_smoothing:g}")
    if t.method == "simpo":
        parts.append(f"gamma {p.simpo_gamma:g}")
    if t.method == "kto":
        parts.append(f"weights {p.desirable_weight:g}/{p.undesirable_weight:g}")
    if t.method in ("dpo", "kto"):
        parts.append("reference: the base with the adapter disabled"
                     + (", log-probs precomputed" if p.reference == "precomputed" else ""))
    return ", ".join(parts)


def _training(cfg: Config, run: dict) -> str:
    t = cfg.train
    length = f"{t.max_steps} steps" if t.max_steps > 0 else f"{t.epochs:g} epochs"
    warmup = f"{t.warmup_steps} steps" if t.warmup_steps > 0 else f"{t.warmup_ratio:g} of the steps"
    batch = t.batch_size if isinstance(t.batch_size, int) else 0
    code = [("model code", CODES[run["implementation"]])] if run.get("implementation") in CODES else []
    if run.get("batching") == "padding_free":
        layout = f"padding-free, up to {run.get('tokens_per_batch', 0):,} tokens each"
    else:
        layout = f"padded, {t.batch_size} sequences each"
    method = [("objective", _objective(cfg))] if t.method != "sft" else []
    rows = [("length", length), *method, *code, ("micro-batches", layout), ("gradient accumulation", t.grad_accum),
            ("sequences per optimizer step", batch * t.grad_accum), ("optimizer", t.optimizer),
            ("learning rate", f"{t.lr:g}"), ("schedule", f"{t.scheduler}, warmup {warmup}"),
            ("weight decay", f"{t.weight_decay:g}"), ("max grad norm", f"{t.max_grad_norm:g}"),
            ("LoRA+ ratio", f"{t.loraplus_ratio:g}"), ("seed", t.seed)]
    lines = ["## Training", "", "| setting | value |", "|---|---|", *(f"| {k} | {v} |" for k, v in rows), "",
             "The complete resolved config is `loratune.yaml` in this folder."]
    return "\n".join(lines) + "\n"


def _results(cfg: Config, f: CardFacts) -> str:
    r = f.run
    lines = ["## Results", "",
             f"- Optimizer steps: {r.get('steps')} ({r.get('epochs', 0):.2f} epochs), {r.get('tokens', 0):,} "
             f"{_unit(cfg)}, {r.get('seconds', 0):.1f} s of training"]
    first, last = r.get("first_train_loss"), r.get("train_loss")
    if isinstance(last, (int, float)):
        start = (f"{first:.4f} ({span_text(r.get('first_train_loss_steps'))}) -> "
                 if isinstance(first, (int, float)) else "")
        lines.append(f"- Train loss: {start}{last:.4f} ({span_text(r.get('train_loss_steps'))}), each the mean loss "
                     f"per {_unit(cfg).removesuffix('s')} over those steps")
    if isinstance(r.get("best_eval_loss"), (int, float)):
        lines.append(f"- Eval loss: best {r['best_eval_loss']:.4f} at step {r.get('best_step')}"
                     + (f", last {r['eval_loss']:.4f} at step {r.get('steps')}"
                        if isinstance(r.get("eval_loss"), (int, float)) else ""))
    bench = r.get("benchmark")
    if isinstance(bench, dict) and bench.get("last"):
        b = cfg.train.eval_benchmark
        lines.append(f"- {bench_line(bench)}, {b.shots}-shot multiple choice ({b.style}), scored during training as "
                     "`loratune eval` scores it")
    if r.get("adapter") and not _full(cfg):
        lines.append(f"- Weights in this folder: {r['adapter']}")
    if f.plot:
        lines += ["", "![train and eval loss](loss.png)"]
    lines += ["", "Every logged value is in `metrics.jsonl`."]
    return "\n".join(lines) + "\n"


def bench_line(summary: dict) -> str:
    """'mmlu accuracy (n=570): 0.2456 at step 0 -> 0.2632 at step 100' (train.eval_benchmark, for the run's
    summary and the card)."""
    first, last = summary["first"], summary["last"]

    def value(s: dict) -> str:
        return "n/a" if not isinstance(s.get("acc"), (int, float)) else f"{s['acc']:.4f}"

    change = f"{value(first)} at step {first['step']} -> " if first["step"] != last["step"] else ""
    return f"{summary['name']} accuracy (n={summary['n']}): {change}{value(last)} at step {last['step']}"


def _cell(text: str | None) -> str:
    if text is None:
        return ""
    text = text.strip().replace("|", "\\|").replace("\r", "").replace("\n", "<br>")
    return text or "(empty)"


def _samples(samples: list[dict]) -> str:
    if not samples:
        return ""
    lines = ["## Sample answers", "", "Greedy answers to `output.sample_prompts`, before and after training "
             "(from `samples.json`).", "", "| prompt | before | after |", "|---|---|---|"]
    lines += [f"| {_cell(s.get('prompt'))} | {_cell(s.get('before'))} | {_cell(s.get('after'))} |" for s in samples]
    return "\n".join(lines) + "\n"


def _usage(cfg: Config) -> str:
    out, path, q = cfg.output.dir, cfg.model.path, cfg.quantization
    code = ["from transformers import AutoModelForCausalLM, AutoTokenizer"]
    tokenizer = f"tokenizer = AutoTokenizer.from_pretrained({out!r})  # with the chat template used in training"
    if _full(cfg):
        code += ["", f"model = AutoModelForCausalLM.from_pretrained({out!r})", tokenizer]
    else:
        dtype = f"torch.{_TORCH_NAMES[_compute(cfg)]}"
        code[:0] = ["import torch", "from peft import PeftModel"]
        setup, load, after = [], "", []
        if q.method == "hqq" and q.bits <= 8:  # the base quantized as in training (loratune.model.hqq_base)
            code += ["from loratune.model.hqq_base import quantize_hqq"]
            after = [f"quantize_hqq(base, {q.bits}, {q.group_size}, {dtype}, 'cuda')  # HQQ, as in training",
                     "base.to('cuda')  # the rest of the model (embedding, norms, head)"]
        elif q.bits in (4, 8):
            code[-1] += ", BitsAndBytesConfig"
            setup = ([f"quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type={q.quant_type!r},",
                      f"                                  bnb_4bit_use_double_quant={q.double_quant}, "
                      f"bnb_4bit_compute_dtype={dtype})"] if q.bits == 4
                     else ["quantization = BitsAndBytesConfig(load_in_8bit=True)"])
            load = ", quantization_config=quantization"
        if q.bits != 32:
            load += f", dtype={dtype}"  # the frozen weights that are not quantized, as in training
        if path.startswith(DEMO_SCHEME):
            code += ["from loratune.model.load import resolve_model_path", "",
                     f"base_path = resolve_model_path({path!r})  # the demo model's folder (built offline once)"]
        else:
            code += ["", f"base_path = {path!r}"]
        code += [*setup, f"base = AutoModelForCausalLM.from_pretrained(base_path{load})", *after,
                 f"model = PeftModel.from_pretrained(base, {out!r})", tokenizer]
    lines = ["## How to use it", "", "In the terminal, with the chat template and stop text of training:", "",
             "```bash", f"loratune chat {out}", "```", "", "In Python:", "", "```python", *code, "```"]
    return "\n".join(lines) + "\n"


def _versions(versions: dict[str, str]) -> str:
    lines = ["## Framework versions", "", *(f"- {name} {v}" for name, v in versions.items())]
    return "\n".join(lines) + "\n"
