"""New tokens (`model.add_tokens`, `model.add_special_tokens`): added to the tokenizer, the embeddings resized,
their rows trained and saved with the adapter, the tokenizer saved with the run.

The known failure this guards against (the QLoRA repository's, among others): tokens added to the tokenizer,
the embedding resized and trained, and then the adapter saved without the embedding rows, or loaded onto a base
that was never resized, so the new tokens come back untrained (or loading fails on a shape mismatch).
Here:
    tokenizer   `add_to_tokenizer`, called by `loratune.model.load.load_tokenizer`, so data, training and the
                tokenizer saved in the run folder all hold the tokens (ids after the base vocabulary, in order).
    model       `resize_for_tokens` grows the input embedding and the output head to the tokenizer's length;
                new rows start at the mean of the old ones (transformers' `mean_resizing`), so they change the
                model's other outputs as little as possible.
    adapter     `trained_modules` names the input embedding and the output head (as the model names them,
                e.g. `embed_tokens`, `lm_head`) for peft's `modules_to_save`: both are trained in full and saved in
                adapter_model.safetensors at their new size. A tied head is saved as its own copy.
    loading     `resize_to_tokenizer` grows a base to a run folder's tokenizer before peft loads the adapter
                (`loratune chat`/`serve`; by hand: `base.resize_token_embeddings(len(tokenizer))`, then
                `PeftModel.from_pretrained`).

loratune's own decoder does not train embeddings: runs with new tokens train through transformers + peft.
"""

from __future__ import annotations

import logging

from torch import nn

log = logging.getLogger(__name__)


def add_to_tokenizer(tokenizer, tokens: list[str], special: list[str]) -> int:
    """Add `tokens` (plain) and `special` (special tokens: never split, skipped when decoding answers) to the
    tokenizer, those it lacks only; returns how many were new."""
    added = tokenizer.add_tokens(list(tokens)) if tokens else 0
    if special:
        added += tokenizer.add_tokens(list(special), special_tokens=True)
    return int(added)


def resize_for_tokens(model: nn.Module, vocab: int) -> bool:
    """Grow the model's input embedding (and head) to `vocab` rows, new rows at the mean of the old ones; returns
    whether it grew. A model with more rows than the tokenizer (padded vocabularies) is left as it is."""
    rows = model.get_input_embeddings().weight.shape[0]
    if vocab <= rows:
        return False
    model.resize_token_embeddings(vocab, mean_resizing=True)
    log.info("embeddings resized from %d to %d rows for the added tokens", rows, vocab)
    return True


def trained_modules(model: nn.Module) -> list[str]:
    """The leaf names of the model's input embedding and output head (what `modules_to_save` takes)."""
    wanted = [m for m in (model.get_input_embeddings(), model.get_output_embeddings()) if m is not None]
    names = []
    for name, module in model.named_modules():
        if any(module is w for w in wanted):
            names.append(name.rsplit(".", 1)[-1])
    return list(dict.fromkeys(names))


def resize_to_tokenizer(model: nn.Module, tokenizer) -> bool:
    """Before loading a run's adapter onto its base: the base grown to the run tokenizer's length (its added
    tokens); returns whether it grew."""
    return resize_for_tokens(model, len(tokenizer))
