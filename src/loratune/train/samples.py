"""Sample answers before and after training: the plainest evidence of what the fine-tune changed.

`output.sample_prompts` are answered greedily (`output.sample_max_new_tokens` new tokens) by the model
being trained, rendered with the chat template the training data was rendered with and stopped at its end
of turn, exactly as `loratune chat OUT` will render and stop. So the "after" answer of a finished run is the
answer chat gives greedily. Both model codes (loratune's decoder, transformers + peft) answer through the
project's one generation engine (`loratune.infer.load.engine_for`), with the adapter being trained on.

Generating must leave training untouched, which is why `answer` is careful:
- eval mode (no dropout) and `torch.inference_mode` (no autograd state); the previous mode comes back;
- every random generator is saved and restored around it (greedy decoding draws nothing, and a private
  generator is used anyway, but exact resume must not depend on that staying true);
- bitsandbytes would repack 4-bit weights for its CPU kernel in eval mode;
  `loratune.model.quant.keep_standard_4bit_layout` (applied when the base is loaded) prevents that, so the frozen base is bit for bit the same afterwards.

The answers go to `OUT/samples.json` ("before" written as soon as it exists, so that a run killed and
resumed still shows it at the end; a resumed run never answers "before" again: its weights are trained).
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch

from loratune.data.templates import ChatTemplate
from loratune.infer.engine import Delta
from loratune.infer.load import engine_for
from loratune.infer.sampling import SamplingParams
from loratune.model.build import TrainModel
from loratune.model.load import TokenizerInfo
from loratune.train.run_folder import write_json_atomic
from loratune.train.trainer_state import load_rng_state, rng_state

SAMPLES_FILE = "samples.json"


@contextlib.contextmanager
def preserved_rng() -> Iterator[None]:
    """Every random generator (Python, numpy, torch CPU and CUDA) is as before when the block ends."""
    tensors, meta = rng_state()
    try:
        yield
    finally:
        load_rng_state(tensors, meta)


def answer(model: TrainModel, tokenizer, info: TokenizerInfo, template: ChatTemplate, prompts: Sequence[str],
           max_new_tokens: int) -> list[str]:
    """Greedy answers of `model` to each prompt (one user turn each), as `loratune chat` would give them."""
    # the output folder's tokenizer carries the training template (run_folder.save_run sets the same);
    # chat reads it from there, so the answers here are rendered with it too
    tokenizer.chat_template = template.jinja
    module = model.module
    was_training = module.training
    module.eval()
    try:
        with preserved_rng(), torch.inference_mode():
            engine = engine_for(module, tokenizer, info, template.stop, template=template,
                                context_length=model.context_length, generation_config=model.generation_config)
            params = SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0)
            return ["".join(e.text for e in engine.chat([{"role": "user", "content": p}], params)
                            if isinstance(e, Delta)) for p in prompts]
    finally:
        module.train(was_training)


def read_samples(out: Path) -> dict:
    path = out / SAMPLES_FILE
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def write_samples(out: Path, prompts: Sequence[str], before: Sequence[str] | None,
                  after: Sequence[str] | None = None, after_step: int | None = None) -> None:
    """`OUT/samples.json`: one entry per prompt with its answers before and after training."""
    entries = [{"prompt": p, "before": before[i] if before else None, "after": after[i] if after else None}
               for i, p in enumerate(prompts)]
    write_json_atomic(out / SAMPLES_FILE, {"decoding": "greedy", "after_step": after_step, "samples": entries})


def _line(text: str) -> str:
    """One display line: newlines shown as ⏎, an empty answer said so."""
    text = text.strip()
    return text.replace("\r", "").replace("\n", " ⏎ ") if text else "(empty answer)"


def format_before(prompts: Sequence[str], before: Sequence[str], max_new_tokens: int) -> str:
    lines = [f"sample answers before training (greedy, at most {max_new_tokens} new tokens):"]
    for p, b in zip(prompts, before):
        lines += [f"  > {p}", f"    {_line(b)}"]
    return "\n".join(lines)


def format_comparison(prompts: Sequence[str], before: Sequence[str] | None, after: Sequence[str]) -> str:
    lines = ["sample answers, before -> after training (greedy):" if before else
             "sample answers after training (greedy):"]
    for i, p in enumerate(prompts):
        lines.append(f"  > {p}")
        if before:
            lines.append(f"    before: {_line(before[i])}")
        lines.append(f"    after:  {_line(after[i])}" if before else f"    {_line(after[i])}")
    return "\n".join(lines)
