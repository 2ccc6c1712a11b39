"""The `loratune export` command: merge (`merge.export`), then the optional GGUF file with its Ollama
Modelfile (`gguf_export`) and the push to a hub repository (`hub`), or the adapter pushed alone.

Kept apart from `loratune.cli` so the command's flow lives beside the export modules; the CLI module only
declares the command and calls `run_export`.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from loratune.export.gguf_quant import KINDS


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options of GGUF export and of the hub push (the merge's own are declared in loratune.cli)."""
    p.add_argument("--gguf", choices=KINDS, metavar="{" + ",".join(KINDS) + "}",
                   help="also write the merged model as one GGUF file in --out (f16, q8_0 or q4_K weights) with an "
                        "Ollama Modelfile, checked against the merged model with llama-cpp-python if installed")
    p.add_argument("--gguf-min-agreement", type=float, default=None,
                   help="fail if llama.cpp's top-1 agreement with the merged model is below this (default: "
                        "0.99 for f16, 0.95 for q8_0, none for q4_K; llama.cpp must also follow the GGUF's own weights, >= 0.90)")
    p.add_argument("--push-to-hub", metavar="REPO",
                   help="upload the merged folder (or with --adapter-only the adapter) to this hub repository, with "
                        "a model card from the run; the endpoint is HF_ENDPOINT (or --hub-endpoint), the token HF_TOKEN "
                        "or a stored login")
    p.add_argument("--adapter-only", action="store_true",
                   help="with --push-to-hub: push the adapter folder as it is, without merging (no --out)")
    p.add_argument("--private", action="store_true", help="create the hub repository private")
    p.add_argument("--hub-endpoint", help="hub URL (default: HF_ENDPOINT, else huggingface.co)")


def _eot_id(out: Path, stop: str | None) -> int | None:
    """The end-of-turn token id when the run's stop text is one token other than eos."""
    from transformers import AutoTokenizer

    if not stop:
        return None
    tok = AutoTokenizer.from_pretrained(out)
    ids = tok(stop, add_special_tokens=False).input_ids
    return ids[0] if len(ids) == 1 and ids[0] != tok.eos_token_id else None


def run_export(args: argparse.Namespace) -> None:
    from loratune.export.hub import HubError, push, write_merged_card
    from loratune.export.merge import ExportError, export
    from loratune.infer.load import read_run_folder

    if args.adapter_only:
        if not args.push_to_hub:
            raise ExportError("--adapter-only pushes the adapter as it is: it needs --push-to-hub REPO")
        if args.gguf or args.out:
            raise ExportError("--adapter-only pushes the adapter without merging: drop --out and --gguf")
        run = read_run_folder(args.adapter)
        url = push(run.path, args.push_to_hub, private=args.private, endpoint=args.hub_endpoint)
        print(f"pushed the adapter {run.path} to {args.push_to_hub}: {url}")
        return
    if not args.out:
        raise ExportError("--out is required: the folder the merged model is written to")
    export(args.adapter, args.out, dtype=args.dtype, quantize_4bit=args.quantize_4bit, shard_size=args.shard_size,
           overwrite=args.overwrite, min_agreement=args.min_agreement)
    out = Path(args.out)
    if args.gguf:
        from loratune.export.gguf_export import export_gguf, print_gguf_report

        run = read_run_folder(args.adapter)
        report = export_gguf(out, args.gguf, stops=[run.stop] if run.stop else [], source=str(run.path),
                             eot_id=_eot_id(out, run.stop), min_agreement=args.gguf_min_agreement)
        print_gguf_report(report)
    if args.push_to_hub:
        write_merged_card(out, Path(args.adapter))
        try:
            url = push(out, args.push_to_hub, private=args.private, endpoint=args.hub_endpoint)
        except HubError as e:
            raise HubError(f"{e}; the merged model stays in {out}") from None
        print(f"pushed {out} to {args.push_to_hub}: {url}")
