"""`loratune export RUN --out DIR --gguf KIND`: the merged folder as a GGUF file, an Ollama Modelfile, and
a check of the GGUF by the tool users run it with.

After `loratune.export.merge.export` has written and verified the merged model in DIR, this writes
DIR/<name>-<kind>.gguf (`loratune.export.gguf.convert`) and DIR/Modelfile (`loratune.export.modelfile`),
then loads the GGUF with llama-cpp-python (llama.cpp itself) and compares, on probe conversations rendered
with the run's template and each followed by the merged model's own greedy answer, llama.cpp's logits at
every position with the merged model's (transformers, fp32): top-1 agreement, largest logit difference, and
whether llama.cpp tokenizes the probe texts into the same ids as the tokenizer the model was trained with.
Two agreements are measured: with the merged model (what the encoding costs, plus any error), and with the
merged model carrying the GGUF's own weights read back (`load_gguf_weights`: dequantized by the `gguf`
package): the second says whether llama.cpp computes the model the file holds, whatever the encoding.
It is not exact even so: llama.cpp's quantized dot products round the activations to 8 bits as well (on
random test models, whose logits are nearly tied, q8_0 files agree about 98%, q4_K about 93-98%), while a
layout error (a wrong permutation, a misnamed tensor) leaves little agreement at all.
Errors, after which the GGUF and Modelfile are removed: a tokenizer mismatch, the second agreement below
90%, or the first below the kind's threshold (f16 99%, q8_0 95%, or --gguf-min-agreement; q4_K has none by
default: what 4 bits cost depends on the model, and on a random test model it is large). Without llama-cpp-python installed the files
are written and the report says they were not checked.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from loratune.export.merge import PROBES, Agreement, ExportError, compare

log = logging.getLogger(__name__)

MIN_AGREEMENT = {"f16": 0.99, "q8_0": 0.95, "q4_K": None}  # q4_K: gated by the faithfulness check alone
MIN_FAITHFUL = 0.90  # not 1: llama.cpp's quantized dot products round the activations to 8 bits too
TOKENIZER_TEXTS = ["The quick brown fox jumps over the lazy dog.", "  two spaces, tabs\tand\nnewlines  ",
                   "Numbers 12345 and 3.14159; punctuation!? (yes) — dashes, café, naïve, 日本語."]


@dataclass
class GgufReport:
    gguf: str
    modelfile: str
    kind: str
    bytes: int
    types: dict[str, int]
    checked: bool
    agreement: Agreement | None = None  # llama.cpp vs the merged model: the cost of the encoding, and any error
    faithful: Agreement | None = None  # llama.cpp vs the merged model with the GGUF's own (dequantized) weights
    tokenizer_same: int = 0  # probe texts tokenized identically by llama.cpp
    tokenizer_total: int = 0
    warnings: list[str] = field(default_factory=list)


def llama_cpp_available() -> bool:
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        return False
    return True


def llama_cpp_logits(path: Path, prompts: list[list[int]]) -> list[torch.Tensor]:
    """llama.cpp's logits [T, V] at every position of each prompt (one fresh context per prompt)."""
    from llama_cpp import Llama

    n_ctx = max(len(p) for p in prompts) + 8
    llm = Llama(model_path=str(path), n_ctx=n_ctx, n_batch=n_ctx, logits_all=True, verbose=False, seed=0)
    out = []
    for p in prompts:
        llm.reset()
        llm.eval(p)
        out.append(torch.from_numpy(np.array(llm.scores[:len(p)], dtype=np.float32)))
    llm.close() if hasattr(llm, "close") else None
    return out


def llama_cpp_tokenize(path: Path, texts: list[str]) -> list[list[int]]:
    from llama_cpp import Llama

    llm = Llama(model_path=str(path), vocab_only=True, verbose=False)
    return [llm.tokenize(t.encode("utf-8"), add_bos=False, special=True) for t in texts]


def _probe_ids(model, tok, answer_tokens: int) -> tuple[list[list[int]], list[str]]:
    """Probe prompts (rendered with the saved chat template) each followed by the model's greedy answer, and
    the texts used to compare tokenizers."""
    texts, prompts = [], []
    for chat in PROBES:
        text = tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=True) if tok.chat_template \
            else "\n".join(m["content"] for m in chat)
        texts.append(text)
        ids = tok(text, add_special_tokens=False).input_ids
        if tok.bos_token_id is not None and (not ids or ids[0] != tok.bos_token_id):
            plain = tok("a").input_ids
            if plain and plain[0] == tok.bos_token_id:
                ids = [tok.bos_token_id] + ids
        with torch.no_grad():
            answer = model.generate(torch.tensor([ids]), max_new_tokens=answer_tokens, do_sample=False,
                                    pad_token_id=tok.pad_token_id or tok.eos_token_id)[0].tolist()
        prompts.append(answer)
    sentence = tok(TOKENIZER_TEXTS[0]).input_ids
    return prompts + [sentence], texts + TOKENIZER_TEXTS


def export_gguf(folder: str | Path, kind: str, *, stops: list[str], source: str, eot_id: int | None = None,
                min_agreement: float | None = None, answer_tokens: int = 24) -> GgufReport:
    """Write and check the GGUF and Modelfile of the merged model in `folder` (see the module docstring)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from loratune.data.templates import render_text
    from loratune.export.gguf import convert
    from loratune.export.modelfile import measure, modelfile

    folder = Path(folder)
    tok = AutoTokenizer.from_pretrained(folder)
    name = folder.resolve().name
    path = folder / f"{name}-{kind}.gguf"
    info = convert(folder, path, kind, name=name, eot_id=eot_id)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    fmt = None
    if tok.chat_template:
        fmt = measure(lambda m, g: render_text(tok, tok.chat_template, m, add_generation_prompt=g))
    warnings = list(info.warnings)
    if tok.chat_template and fmt is None:
        warnings.append("the chat template does not reduce to per-message pieces: the Modelfile has no TEMPLATE")
    gen = getattr(model, "generation_config", None)
    params = {k: float(getattr(gen, k)) for k in ("temperature", "top_p") if gen is not None and
              getattr(gen, "do_sample", False) and getattr(gen, k, None) is not None}
    mf = folder / "Modelfile"
    mf.write_text(modelfile(path.name, fmt=fmt, bos_text=tok.bos_token, add_bos=info.add_bos,
                            stops=stops + ([tok.eos_token] if tok.eos_token else []),
                            num_ctx=int(getattr(model.config, "max_position_embeddings", 2048)), source=source,
                            parameters=params), encoding="utf-8")
    report = GgufReport(str(path), str(mf), kind, info.bytes, info.types, False, warnings=warnings)
    if not llama_cpp_available():
        report.warnings.append("not checked: llama-cpp-python is not installed (pip install 'loratune[gguf]')")
        return report
    try:
        prompts, texts = _probe_ids(model, tok, answer_tokens)
        with torch.no_grad():
            reference = [model(input_ids=torch.tensor([p])).logits[0].float() for p in prompts]
        theirs_logits = llama_cpp_logits(path, prompts)
        report.agreement = compare(reference, theirs_logits)
        load_gguf_weights(model, path)  # the model as the file holds it: what llama.cpp should compute
        with torch.no_grad():
            held = [model(input_ids=torch.tensor([p])).logits[0].float() for p in prompts]
        report.faithful = compare(held, theirs_logits)
        ours = llama_cpp_tokenize(path, texts)
        theirs = [tok(t, add_special_tokens=False).input_ids for t in texts]
        report.tokenizer_same = sum(a == b for a, b in zip(ours, theirs))
        report.tokenizer_total = len(texts)
        report.checked = True
        _check(report, MIN_AGREEMENT[kind] if min_agreement is None else min_agreement)
    except ExportError:
        path.unlink(missing_ok=True)
        mf.unlink(missing_ok=True)
        raise
    finally:
        (folder / f"{path.stem}.check.json").write_text(json.dumps(asdict(report), indent=2), encoding="utf-8")
    return report


def load_gguf_weights(model: torch.nn.Module, path: Path) -> None:
    """Replace `model`'s weights (a transformers model of the exported folder) by the GGUF's, dequantized with
    the `gguf` package and brought back to transformers' layout (q/k rows un-permuted, Gemma's norms - 1)."""
    from gguf import GGUFReader, quants

    from loratune.export.gguf import ARCHS, gguf_name

    arch = ARCHS[model.config.model_type]
    tensors = {t.name: t for t in GGUFReader(path).tensors}
    heads, kv = model.config.num_attention_heads, model.config.num_key_value_heads
    state = model.state_dict()
    with torch.no_grad():
        for name, param in state.items():
            gname = gguf_name(name, arch.sandwich)
            if gname is None or gname not in tensors:
                continue  # a tied head, a buffer
            t = tensors[gname]
            w = torch.from_numpy(quants.dequantize(t.data, t.tensor_type).reshape(param.shape).copy())
            if arch.permute_qk and (".attn_q." in gname or ".attn_k." in gname):
                n = heads if ".attn_q." in gname else kv
                w = w.reshape(n, w.shape[0] // n // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(param.shape)
            if arch.norm_plus_one and gname.endswith("norm.weight"):
                w = w - 1.0
            param.copy_(w)


def _check(r: GgufReport, min_agreement: float | None) -> None:
    a, f = r.agreement, r.faithful
    if r.tokenizer_same != r.tokenizer_total:
        raise ExportError(f"llama.cpp tokenizes {r.tokenizer_total - r.tokenizer_same} of {r.tokenizer_total} probe "
                          "texts differently from the model's tokenizer; the GGUF was removed")
    if f is None or not np.isfinite(f.max_diff) or f.top1 < MIN_FAITHFUL:
        top1 = "n/a" if f is None else f"{f.top1:.1%}"
        raise ExportError(f"llama.cpp on the {r.kind} GGUF agrees with the model its weights hold on only {top1} of "
                          f"next tokens (at least {MIN_FAITHFUL:.0%} wanted): the file is not read as written; "
                          "the GGUF was removed")
    if min_agreement is None:
        return
    if a is None or not np.isfinite(a.max_diff) or a.top1 < min_agreement:
        top1 = "n/a" if a is None else f"{a.top1:.1%}"
        raise ExportError(f"the {r.kind} GGUF agrees with the merged model on {top1} of next tokens (at least "
                          f"{min_agreement:.0%} wanted); the GGUF was removed")


def print_gguf_report(r: GgufReport) -> None:
    types = ", ".join(f"{n} {k}" for k, n in sorted(r.types.items()))
    print(f"GGUF ({r.kind}): {r.gguf}  {r.bytes / 2**20:.1f} MiB of tensors ({types})")
    print(f"  Ollama Modelfile: {r.modelfile}")
    if r.agreement is not None:
        a = r.agreement
        print(f"  llama.cpp vs merged model: top-1 agreement {a.top1:7.2%}   max |logit diff| {a.max_diff:.4g}   "
              f"mean {a.mean_diff:.3g}   ({a.positions} positions)")
        if r.faithful is not None:
            f = r.faithful
            print(f"  llama.cpp vs the GGUF's own weights: top-1 agreement {f.top1:7.2%}   max |logit diff| "
                  f"{f.max_diff:.4g}")
        print(f"  tokenizer: llama.cpp gives the same ids on {r.tokenizer_same} of {r.tokenizer_total} probe texts")
    for w in r.warnings:
        print(f"  warning: {w}")
