"""`--push-to-hub REPO`: upload an adapter folder or a merged export to a Hugging Face hub repository.

Through huggingface_hub's public API only (`HfApi.create_repo`, `HfApi.create_commit` with one
`CommitOperationAdd` per file): the hub decides per file whether it goes inline or through its large-file
storage, as for any client. The endpoint is huggingface_hub's (the HF_ENDPOINT environment variable, read
when huggingface_hub is imported) unless `endpoint` is given; the token is huggingface_hub's (HF_TOKEN or a
stored login) unless `token` is given.

The model card (`README.md`) comes from the run: `loratune train` writes it into the adapter folder (base,
data, config, metrics, evaluation results; `loratune.train.card`). The adapter is pushed with it as it is;
a merged export gets the same card with its front matter made a full model's (`library_name: transformers`,
tagged `merged`, and `gguf` with GGUF files) and a section saying how it was made from the adapter and how
closely it follows it (the export's own agreement numbers, and llama.cpp's for each GGUF).
What is not part of a model is left out: training checkpoints (`checkpoints/`), staging folders, caches.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import yaml

from loratune.errors import LoratuneError

SKIP_DIRS = {"checkpoints", ".cache", "__pycache__"}


class HubError(LoratuneError):
    """The push to the hub failed."""


def files_to_push(folder: Path) -> list[Path]:
    """Every file of `folder` that belongs to the model (relative paths, sorted)."""
    out = []
    for p in sorted(folder.rglob("*")):
        rel = p.relative_to(folder)
        if p.is_file() and not any(part in SKIP_DIRS or part.startswith(".") for part in rel.parts):
            out.append(rel)
    return out


def _split_front_matter(text: str) -> tuple[dict, str]:
    m = re.match(r"^---\n(.*?)\n---\n", text, re.S)
    if not m:
        return {}, text
    return yaml.safe_load(m.group(1)) or {}, text[m.end():]


def _line(label: str, a: dict) -> str:
    return (f"| {label} | {a['top1']:.2%} | {a['max_diff']:.4g} | {a['mean_diff']:.3g} | {a['positions']} |")


def merged_card(run_card: str, export: dict, gguf: list[dict], adapter: str) -> str:
    """The merged export's card: the run's card (base, data, config, metrics, eval results) with a full
    model's front matter and a section on the merge (from `loratune_export.json` and the GGUF checks)."""
    meta, body = _split_front_matter(run_card)
    meta["library_name"] = "transformers"
    tags = [t for t in meta.get("tags", []) if t not in ("lora", "qlora")]
    meta["tags"] = list(dict.fromkeys(tags + ["merged"] + (["gguf"] if gguf else [])))
    lines = ["## Export", "",
             f"The adapter `{Path(adapter).name}` merged into its base and saved in {export.get('dtype', '?')} by "
             "`loratune export` (a QLoRA adapter is merged into the base dequantized from 4 bits, the weights it was "
             "trained against). Next-token logits on probe conversations:", "",
             "| comparison | top-1 agreement | max abs logit diff | mean | positions |", "|---|---:|---:|---:|---:|"]
    if export.get("merged_vs_adapter"):
        lines.append(_line("merged vs adapter on the dequantized base", export["merged_vs_adapter"]))
    if export.get("adapter_dequant_vs_trained"):
        lines.append(_line("adapter on dequantized vs quantized base", export["adapter_dequant_vs_trained"]))
    for g in gguf:
        if g.get("agreement"):
            lines.append(_line(f"GGUF {g['kind']} (llama.cpp) vs merged", g["agreement"]))
    if gguf:
        lines += ["", "GGUF files (llama.cpp, Ollama: `ollama create NAME -f Modelfile`):", ""]
        lines += [f"- `{Path(g['gguf']).name}`: {g['kind']}, {g['bytes'] / 2**20:.1f} MiB of tensors" for g in gguf]
    body = re.sub(r"^# (.*)\n", lambda m: f"# {m.group(1)} (merged)\n", body, count=1, flags=re.M)
    head, sep, rest = body.partition("\n## ")
    section = "\n".join(lines) + "\n"
    body = f"{head}\n{section}{sep}{rest}" if sep else f"{body}\n{section}"
    return "---\n" + yaml.safe_dump(meta, sort_keys=False, allow_unicode=True) + "---\n" + body


def write_merged_card(out: Path, adapter: Path) -> None:
    """README.md of the merged folder `out`, from the adapter's card and the export's reports."""
    run_card = (adapter / "README.md").read_text(encoding="utf-8") if (adapter / "README.md").is_file() else \
        f"# {adapter.name}\n"
    report = out / "loratune_export.json"
    export = json.loads(report.read_text(encoding="utf-8")) if report.is_file() else {}
    gguf = [json.loads(p.read_text(encoding="utf-8")) for p in sorted(out.glob("*.check.json"))]
    (out / "README.md").write_text(merged_card(run_card, export, gguf, str(adapter)), encoding="utf-8")


def push(folder: str | Path, repo_id: str, *, private: bool = False, endpoint: str | None = None,
         token: str | None = None, message: str | None = None) -> str:
    """Create `repo_id` if needed and commit the model files of `folder` to it; returns the commit's URL."""
    from huggingface_hub import CommitOperationAdd, HfApi
    from huggingface_hub.errors import HfHubHTTPError

    folder = Path(folder)
    files = files_to_push(folder)
    if not files:
        raise HubError(f"{folder} holds no files to push")
    if not (folder / "README.md").is_file():
        raise HubError(f"{folder} has no README.md (model card); `loratune train` writes one")
    api = HfApi(endpoint=endpoint or os.environ.get("HF_ENDPOINT") or None, token=token)
    try:
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        ops = [CommitOperationAdd(path_in_repo=rel.as_posix(), path_or_fileobj=str(folder / rel)) for rel in files]
        info = api.create_commit(repo_id, ops, commit_message=message or f"loratune: upload {folder.name}",
                                 repo_type="model")
    except HfHubHTTPError as e:
        raise HubError(f"pushing {folder} to {repo_id} at {api.endpoint} failed: {str(e).splitlines()[0]}") from None
    except Exception as e:  # no network, refused connection, DNS: the HTTP client's transport errors
        if not (isinstance(e, OSError) or any(c.__name__ == "TransportError" for c in type(e).__mro__)):
            raise
        raise HubError(f"pushing {folder} to {repo_id}: cannot reach {api.endpoint} ({e.__class__.__name__}: "
                       f"{str(e).splitlines()[0] if str(e) else 'no detail'}); set HF_ENDPOINT or check the network"
                       ) from None
    return str(info.commit_url)
