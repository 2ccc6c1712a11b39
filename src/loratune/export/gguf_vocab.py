"""The tokenizer of a GGUF export: vocabulary, merges, token types and special ids, as llama.cpp reads them.

Read from the loaded tokenizer's definition (its `tokenizers` backend, what `tokenizer.json` holds once
transformers has applied the family's tokenizer class), so the GGUF tokenizes as the model was trained. Two kinds, told apart by the tokenizer's own definition:
- byte-level BPE (Llama 3, Qwen2, GPT-2 style; the `ByteLevel` pre-tokenizer): llama.cpp's `gpt2` model,
  with the merges and a named pre-tokenizer (`tokenizer.ggml.pre`). llama.cpp splits text with a regex of
  its own per name, so the name is chosen from the tokenizer's split regex (GPT-2's, Llama 3's or Qwen2's);
  a regex we do not know is an error naming it, rather than a GGUF that tokenizes differently;
- SentencePiece BPE with byte fallback (Llama 2, Mistral, Gemma; `tokenizer.json` converted from a
  `tokenizer.model`): llama.cpp's `llama` model, scores ordered like SentencePiece's (earlier pieces merge
  first), `<0xNN>` byte pieces, and whether a space is prefixed.
Token types: added special tokens are CONTROL (matched only when special tokens are parsed), other added
tokens USER_DEFINED, the ids past the tokenizer's vocabulary up to the model's `vocab_size` UNUSED.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from loratune.export.merge import ExportError

# The split regexes of the byte-level BPE tokenizers llama.cpp knows, by its pre-tokenizer name.
LLAMA3_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                r"\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
               r"\s*[\r\n]+|\s+(?!\S)|\s+")
PRE_BY_REGEX = {LLAMA3_REGEX: "llama-bpe", QWEN2_REGEX: "qwen2"}

NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6


@dataclass
class Vocab:
    model: str  # "gpt2" or "llama"
    pre: str | None
    tokens: list[str]
    types: list[int]
    scores: list[float] | None = None
    merges: list[str] = field(default_factory=list)
    add_space_prefix: bool | None = None


def _pre_tokenizer_name(pre: dict | None, where: Path) -> str:
    """llama.cpp's name for a byte-level BPE pre-tokenizer (see PRE_BY_REGEX)."""
    if pre is None:
        raise ExportError(f"{where}: a byte-level BPE tokenizer without a pre_tokenizer; llama.cpp needs to know "
                          "how text is split")
    if pre.get("type") == "ByteLevel":
        if pre.get("use_regex", True):
            return "gpt-2"
        raise ExportError(f"{where}: a ByteLevel pre_tokenizer without its regex; llama.cpp has no such split")
    if pre.get("type") == "Sequence":
        splits = [p for p in pre.get("pretokenizers", []) if p.get("type") == "Split"]
        if len(splits) == 1:
            regex = splits[0].get("pattern", {}).get("Regex")
            if regex in PRE_BY_REGEX:
                return PRE_BY_REGEX[regex]
            raise ExportError(f"{where}: pre_tokenizer split regex {regex!r} is not one llama.cpp has under a "
                              f"name loratune knows (GPT-2's, Llama 3's, Qwen2's); the GGUF would tokenize "
                              "differently")
        if [p.get("type") for p in pre.get("pretokenizers", [])] == ["ByteLevel"]:
            return _pre_tokenizer_name(pre["pretokenizers"][0], where)
    raise ExportError(f"{where}: pre_tokenizer {json.dumps(pre)[:200]} is not one loratune can name for llama.cpp")


def _is_byte_level(spec: dict) -> bool:
    def has(node: dict | None, kind: str) -> bool:
        if not node:
            return False
        if node.get("type") == kind:
            return True
        return any(has(p, kind) for p in node.get("pretokenizers", []) + node.get("decoders", []))

    return has(spec.get("pre_tokenizer"), "ByteLevel") or has(spec.get("decoder"), "ByteLevel")


def _merges(model: dict) -> list[str]:
    return [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]


def read_vocab(tokenizer, folder: Path, vocab_size: int) -> Vocab:
    """The GGUF vocabulary of `tokenizer` (loaded from `folder`), padded to the model's `vocab_size`.

    Read from the loaded tokenizer's backend, not from tokenizer.json: transformers' tokenizer class of a
    family may set its own pre-tokenizer (Qwen2's splits digits one by one whatever the file says), and the
    GGUF must split as the model was trained."""
    path = folder / "tokenizer.json"
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise ExportError(f"{folder}: the tokenizer has no fast (tokenizers) backend; GGUF export reads its "
                          "definition (a slow-only tokenizer cannot be converted)")
    spec = json.loads(backend.to_str())
    unk_id = tokenizer.unk_token_id
    model = spec.get("model", {})
    if model.get("type") != "BPE":
        raise ExportError(f"{path}: tokenizer model {model.get('type')!r}; GGUF export converts BPE tokenizers "
                          "(byte-level or SentencePiece-style)")
    ids: dict[int, str] = {int(i): t for t, i in model["vocab"].items()}
    added = {int(a["id"]): a for a in spec.get("added_tokens", [])}
    for i, a in added.items():
        ids[i] = a["content"]
    size = max(ids) + 1
    if size > vocab_size:
        raise ExportError(f"{path}: the tokenizer has {size} tokens, more than the model's vocab_size {vocab_size}")
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in ids:
            tokens.append(f"[PAD{i}]")
            types.append(UNUSED)
            continue
        tokens.append(ids[i])
        if i == unk_id:
            types.append(UNKNOWN)
        elif i in added:
            types.append(CONTROL if added[i].get("special") else USER_DEFINED)
        else:
            types.append(NORMAL)
    if _is_byte_level(spec):
        return Vocab("gpt2", _pre_tokenizer_name(spec.get("pre_tokenizer"), path), tokens, types,
                     merges=_merges(model))
    if not model.get("byte_fallback"):
        raise ExportError(f"{path}: a BPE tokenizer that is neither byte-level nor SentencePiece-style (byte "
                          "fallback); llama.cpp has no such tokenizer")
    for i, t in enumerate(tokens):  # byte pieces, in the model's vocabulary or added as tokens
        if types[i] != UNUSED and len(t) == 6 and t.startswith("<0x") and t.endswith(">"):
            types[i] = BYTE
    # SentencePiece BPE merges the highest-scoring pair first; its scores fall with the piece's id
    scores = [-float(i) if types[i] == NORMAL else 0.0 for i in range(vocab_size)]
    text = json.dumps(spec.get("normalizer")) + json.dumps(spec.get("pre_tokenizer"))
    prefix = '"prepend_scheme": "never"' not in text and ('"Prepend"' in text or '"Metaspace"' in text)
    return Vocab("llama", None, tokens, types, scores=scores, add_space_prefix=prefix)
