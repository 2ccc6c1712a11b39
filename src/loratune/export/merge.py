"""`loratune export`: merge an adapter into its base and save a model plain transformers can load.

A QLoRA adapter was trained against the *quantized* base: it learned to correct W_nf4, not the original
W. So the merge starts from the base loaded as in training, dequantized (W_nf4 -> 16-bit), and adds the
LoRA update there, in 16-bit. Merging into the original 16-bit checkpoint instead would silently give a
different model from the one that was trained.

The export checks itself, and fails loudly rather than writing a model that quietly differs:
- every adapted module's weight must change (an update smaller than the 16-bit resolution of the weight
  is rounded away; a zero adapter changes nothing); both are errors;
- on a few prompts (and the run's sample prompts), each followed by the trained model's own greedy answer,
  the merged model's logits are compared with the adapter applied, unmerged, on the same dequantized base:
  top-1 agreement and the largest logit difference are printed, and low agreement fails;
- the saved folder is loaded back with `AutoModelForCausalLM.from_pretrained` and must give the same logits.
Optionally the merged model is re-quantized to NF4 and the extra error this adds is measured and printed.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from loratune.config import Config, ModelConfig
from loratune.errors import LoratuneError
from loratune.infer.load import RunFolder, make_format, quiet_loading, read_run_folder
from loratune.model.hqq_base import dequantize_hqq
from loratune.model.load import load_base, load_tokenizer
from loratune.model.new_tokens import resize_for_tokens
from loratune.model.quant import DTYPES

log = logging.getLogger(__name__)

PROBES = [
    [{"role": "user", "content": "Explain in two sentences what a low-rank adapter is."}],
    [{"role": "system", "content": "You are a helpful assistant."},
     {"role": "user", "content": "Write a haiku about quantization."}],
    [{"role": "user", "content": "What is 17 times 23?"}, {"role": "assistant", "content": "391."},
     {"role": "user", "content": "And divided by 2?"}],
]


class ExportError(LoratuneError):
    """The export cannot be done or did not verify."""


@dataclass
class Agreement:
    """How closely one model's next-token logits follow another's, over every position of the probes."""

    positions: int
    top1: float  # fraction of positions with the same argmax
    max_diff: float  # largest absolute logit difference
    mean_diff: float


@dataclass
class MergeStats:
    modules: int
    unchanged: int  # modules whose weight did not change at all
    min_kept: float  # smallest ||W_merged - W|| / ||delta||: how much of an update survived rounding


@dataclass
class ExportReport:
    out: str
    dtype: str
    merge: MergeStats
    merged_vs_adapter: Agreement  # the required check: merged vs adapter on the dequantized base
    adapter_dequant_vs_trained: Agreement | None  # adapter on dequantized vs on the quantized base
    reload_max_diff: float
    quantized: dict = field(default_factory=dict)  # re-quantized NF4: folder and its agreement numbers


def compare(ref: list[torch.Tensor], got: list[torch.Tensor]) -> Agreement:
    """Top-1 agreement and logit differences between two lists of (T, V) logits."""
    same = total = 0
    max_diff, sum_diff, n = 0.0, 0.0, 0
    for a, b in zip(ref, got, strict=True):
        a, b = a.float(), b.float()
        same += int((a.argmax(-1) == b.argmax(-1)).sum())
        total += a.shape[0]
        d = (a - b).abs()
        max_diff = max(max_diff, float(d.max()))
        sum_diff, n = sum_diff + float(d.sum()), n + d.numel()
    return Agreement(total, same / total, max_diff, sum_diff / n)


@torch.no_grad()
def probe_logits(model: torch.nn.Module, prompts: list[list[int]]) -> list[torch.Tensor]:
    device = next(model.parameters()).device
    return [model(input_ids=torch.tensor([p], device=device)).logits[0].float().cpu() for p in prompts]


@torch.no_grad()
def merge_adapter(peft_model) -> tuple[torch.nn.Module, MergeStats]:
    """Merge every LoRA layer through peft's own `merge(safe_merge=True)` (it rejects non-finite results),
    measuring per module how much of the update reached the stored weight; returns the plain model."""
    from peft.tuners.lora import LoraLayer

    modules = unchanged = 0
    min_kept = math.inf
    zero_adapter = True
    for name, layer in peft_model.named_modules():
        if not isinstance(layer, LoraLayer):
            continue
        (adapter,) = layer.active_adapters
        weight = layer.get_base_layer().weight
        before = weight.detach().clone()
        delta = layer.get_delta_weight(adapter).float()
        layer.merge(safe_merge=True, adapter_names=[adapter])
        change = float((weight.float() - before.float()).norm())
        wanted = float(delta.norm())
        modules += 1
        zero_adapter &= wanted == 0.0
        if change == 0.0:
            unchanged += 1
            log.warning("merging into %s changed nothing (update norm %.3g)", name, wanted)
        if wanted > 0:
            min_kept = min(min_kept, change / wanted)
    if modules == 0:
        raise ExportError("the adapter has no LoRA layers to merge")
    if zero_adapter:
        raise ExportError("the adapter's update is zero in every module (LoRA B is all zeros): nothing to merge; "
                          "was it trained?")
    if unchanged:
        raise ExportError(f"the merge changed nothing in {unchanged} of {modules} modules: their updates are below "
                          "the resolution of the weights; export with --dtype fp32")
    return peft_model.unload(), MergeStats(modules, unchanged, min_kept)


def _probes(fmt, model: torch.nn.Module, sample_prompts: list[str], answer_tokens: int = 32) -> list[list[int]]:
    """Prompts (built-in ones and the run's sample prompts), each followed by `model`'s own greedy answer,
    so agreement is measured inside real answers too, where the model is confident, not only on prompts."""
    from loratune.infer.engine import decode_steps
    from loratune.infer.sampling import SamplingParams

    chats = PROBES + [[{"role": "user", "content": p}] for p in sample_prompts]
    prompts = [fmt.render(m) for m in chats]
    steps = list(decode_steps(model, prompts, SamplingParams(max_new_tokens=answer_tokens),
                              stop_ids=fmt.stop_ids, pad_id=fmt.pad_id))
    answers = [[s[row] for s in steps if s[row] is not None] for row in range(len(prompts))]
    return [p + a for p, a in zip(prompts, answers)] + [fmt.encode("The quick brown fox jumps over the lazy dog.")]


def _load_quantized_with_adapter(cfg: Config, run: RunFolder):
    from peft import PeftModel

    base = load_base(cfg)
    resize_for_tokens(base, len(load_tokenizer(ModelConfig(path=str(run.path)))[0]))  # model.add_tokens runs
    return PeftModel.from_pretrained(base, str(run.path)).eval()


def export(adapter: str | Path, out: str | Path, *, dtype: str = "bf16", quantize_4bit: str | Path | None = None,
           shard_size: str = "5GB", overwrite: bool = False, min_agreement: float = 0.9) -> ExportReport:
    """Merge `adapter` into its dequantized base, save to `out`, verify, print and return the report."""
    with quiet_loading():  # transformers' loading bars, for this export only
        return _export(adapter, out, dtype, quantize_4bit, shard_size, overwrite, min_agreement)


def _export(adapter: str | Path, out: str | Path, dtype: str, quantize_4bit: str | Path | None, shard_size: str,
            overwrite: bool, min_agreement: float) -> ExportReport:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    run = read_run_folder(adapter)
    out = Path(out)
    for folder in (out, Path(quantize_4bit) if quantize_4bit else None):
        if folder is not None:
            _check_destination(folder, overwrite)
    if quantize_4bit and Path(quantize_4bit).resolve() == out.resolve():
        raise ExportError("--quantize-4bit needs a folder of its own, not --out")
    torch_dtype = DTYPES[dtype]
    cfg = Config(model=run.cfg.model, quantization=run.cfg.quantization)
    tok, info = load_tokenizer(ModelConfig(path=str(run.path)))

    quantized = cfg.quantization.bits <= 8
    trained = prompts = None
    if quantized:  # the model as trained: the adapter on the quantized base, for the record
        model = _load_quantized_with_adapter(cfg, run)
        fmt = make_format(tok, info, model, run.stop)
        prompts = _probes(fmt, model, run.cfg.output.sample_prompts)
        trained = probe_logits(model, prompts)
        del model
    # A fresh base, dequantized before any forward: on CPU bitsandbytes repacks 4-bit weights into another
    # layout at the first inference forward, and dequantizing that layout gives garbage.
    base = load_base(cfg)
    if quantized and cfg.quantization.method == "hqq":  # the HQQ weights trained against, as plain linear layers
        dequantize_hqq(base, torch_dtype)
    elif quantized:
        base = base.dequantize(dtype=torch_dtype)
    for p in base.parameters():  # parameters only: buffers such as rotary inv_freq stay as the model made them
        p.data = p.data.to(torch_dtype)
    resize_for_tokens(base, len(tok))  # a run that added tokens: the base grown to its tokenizer (new_tokens.py)
    model = PeftModel.from_pretrained(base, str(run.path)).eval()  # adapter on the dequantized base
    fmt = make_format(tok, info, model, run.stop)
    if prompts is None:
        prompts = _probes(fmt, model, run.cfg.output.sample_prompts)
    reference = probe_logits(model, prompts)
    merged, stats = merge_adapter(model)
    merged_logits = probe_logits(merged, prompts)
    agreement = compare(reference, merged_logits)
    dequant_vs_trained = compare(trained, reference) if trained is not None else None

    generation = _generation_config(merged, tok, fmt.stop_ids)
    merged.generation_config = generation
    # written and verified in staging folders beside the destinations, which receive them only if the
    # verification passes: a failed export never leaves a loadable-looking model behind
    stage = _staging(out)
    stage4 = _staging(Path(quantize_4bit)) if quantize_4bit else None
    try:
        merged.save_pretrained(stage, max_shard_size=shard_size)
        tok.save_pretrained(stage)
        del merged, model, base
        reloaded = AutoModelForCausalLM.from_pretrained(stage, dtype=torch_dtype).eval()
        reload_diff = compare(merged_logits, probe_logits(reloaded, prompts)).max_diff

        report = ExportReport(str(out), dtype, stats, agreement, dequant_vs_trained, reload_diff)
        if quantize_4bit:
            del reloaded
            report.quantized = _requantize(stage, stage4, prompts, merged_logits, trained, tok, generation, torch_dtype)
            report.quantized["out"] = str(quantize_4bit)
        (stage / "loratune_export.json").write_text(json.dumps({"adapter": str(run.path), **asdict(report)}, indent=2))
        print_report(report)
        try:
            _check(report, min_agreement)
        except ExportError as e:
            raise ExportError(f"{e}; nothing was written to {out}") from None
        _publish(stage, out)
        if stage4 is not None:
            _publish(stage4, Path(quantize_4bit))
    finally:
        for folder in (stage, stage4):
            if folder is not None and folder.exists():
                shutil.rmtree(folder, ignore_errors=True)
    return report


def _staging(dest: Path) -> Path:
    """An empty hidden folder beside `dest` (same filesystem, so that publishing is a rename)."""
    stage = dest.parent / f".{dest.name}.partial-{os.getpid()}"
    shutil.rmtree(stage, ignore_errors=True)
    stage.mkdir(parents=True)
    return stage


def _publish(stage: Path, dest: Path) -> None:
    """Replace `dest`'s contents (empty, or --overwrite) by the verified files of `stage`."""
    dest.mkdir(parents=True, exist_ok=True)
    for old in dest.iterdir():
        shutil.rmtree(old) if old.is_dir() and not old.is_symlink() else old.unlink()
    for item in stage.iterdir():
        os.replace(item, dest / item.name)


def _check_destination(folder: Path, overwrite: bool) -> None:
    """Fail before any work if `folder` cannot receive the export."""
    if folder.exists() and not folder.is_dir():
        raise ExportError(f"{folder} is a file; --out and --quantize-4bit name folders")
    if folder.exists() and any(folder.iterdir()) and not overwrite:
        raise ExportError(f"{folder} is not empty; pass --overwrite to write into it")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ExportError(f"cannot create {folder}: {e.strerror}") from None


def _generation_config(model: torch.nn.Module, tok, stop_ids: frozenset[int]):
    """Stop at the template's end of turn, not only at eos, in any transformers `generate`."""
    from transformers import GenerationConfig

    eos = sorted(stop_ids)
    return GenerationConfig(bos_token_id=tok.bos_token_id, eos_token_id=eos[0] if len(eos) == 1 else eos,
                            pad_token_id=tok.pad_token_id)


def _requantize(out: Path, dest: Path, prompts, merged_logits, trained, tok, generation, torch_dtype) -> dict:
    """Save the merged model re-quantized to NF4 (double quant) and measure the error it adds."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                           bnb_4bit_compute_dtype=torch_dtype)
    kwargs = {"device_map": {"": torch.cuda.current_device()}} if torch.cuda.is_available() else {}
    model4 = AutoModelForCausalLM.from_pretrained(out, quantization_config=q, dtype=torch_dtype, **kwargs).eval()
    logits4 = probe_logits(model4, prompts)
    model4.generation_config = generation
    model4.save_pretrained(dest)
    tok.save_pretrained(dest)
    result = {"out": str(dest), "vs_merged": asdict(compare(merged_logits, logits4))}
    if trained is not None:
        result["vs_trained"] = asdict(compare(trained, logits4))
    return result


def print_report(r: ExportReport) -> None:
    def line(label: str, a: Agreement | dict) -> str:
        a = a if isinstance(a, dict) else asdict(a)
        return (f"  {label:<44} top-1 agreement {a['top1']:7.2%}   max |logit diff| {a['max_diff']:.4g}"
                f"   mean {a['mean_diff']:.3g}   ({a['positions']} positions)")

    print(f"exported to {r.out} ({r.dtype})")
    print(f"  merged {r.merge.modules} LoRA modules; smallest fraction of an update kept after rounding "
          f"{r.merge.min_kept:.3f}")
    if r.merge.min_kept < 0.5:
        print(f"  warning: rounding to {r.dtype} lost over half of some module's update; --dtype fp32 keeps it")
    print(line("merged vs adapter on dequantized base", r.merged_vs_adapter))
    if r.adapter_dequant_vs_trained is not None:
        print(line("adapter on dequantized vs on quantized base", r.adapter_dequant_vs_trained))
    print(f"  reloaded with AutoModelForCausalLM: max |logit diff| vs merged {r.reload_max_diff:.3g}")
    if r.quantized:
        print(f"  re-quantized to NF4 in {r.quantized['out']}:")
        print(line("  NF4 merged vs 16-bit merged (added error)", r.quantized["vs_merged"]))
        if "vs_trained" in r.quantized:
            print(line("  NF4 merged vs adapter on quantized base", r.quantized["vs_trained"]))


def _check(r: ExportReport, min_agreement: float) -> None:
    a = r.merged_vs_adapter
    if not math.isfinite(a.max_diff):
        raise ExportError("the merged model's logits are not finite")
    if a.top1 < min_agreement:
        raise ExportError(f"the merged model agrees with the adapter on only {a.top1:.1%} of next tokens "
                          f"(--min-agreement {min_agreement:.0%}); the merge is not faithful")
    if r.reload_max_diff != 0.0:
        raise ExportError(f"the saved model, loaded back, differs from the merged one (max logit diff "
                          f"{r.reload_max_diff:.3g})")
