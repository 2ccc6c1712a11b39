"""The Data tab: a dataset as training will see it (what `loratune data preview` prints), in the page.

The data is prepared by the training pipeline itself (`prepare_data`, with the chosen model's tokenizer
and template), so the detected format, the statistics and the supervised tokens are training's own; a bad
record is reported with its file and row, as the CLI reports it. Files come from the workspace, or are
uploaded into its `uploads/` folder (size-limited, names reduced to safe characters).
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import Any

import gradio as gr

from loratune.config import (
    Config,
    DataConfig,
    DatasetConfig,
    ModelConfig,
    TrainConfig,
    validate,
)
from loratune.data.preview import _runs
from loratune.errors import LoratuneError
from loratune.ui.context import Context, error_box
from loratune.ui.i18n import t
from loratune.ui.paths import MAX_UPLOAD_BYTES, Workspace, WorkspaceError

DATA_SUFFIXES = (".jsonl", ".json", ".csv", ".tsv", ".parquet", ".txt")
FORMATS = ["auto", "messages", "alpaca", "sharegpt", "input_output", "prompt_completion", "text", "oasst"]
SUPERVISED = "supervised"
MAX_SAMPLES_SHOWN = 20


def preview_data(ws: Workspace, dataset: str, model: str, fmt: str, template: str, max_length: int,
                 train_on: str, n: int) -> tuple[str, list[tuple[str, str | None]]]:
    """(statistics as Markdown, the first `n` samples as highlighted text runs)."""
    from loratune.data.pipeline import prepare_data
    from loratune.model.load import load_tokenizer

    cfg = Config(model=ModelConfig(path=ws.source(model, "model.path")),
                 data=DataConfig(datasets=[DatasetConfig(path=ws.source(dataset, "data.datasets.0.path"), format=fmt)],
                                 template=template or "auto", max_length=int(max_length), train_on=train_on),
                 train=TrainConfig())
    validate(cfg)
    tokenizer, info = load_tokenizer(cfg.model)
    data = prepare_data(cfg.data, tokenizer, info, cfg.train.seed, log_stats=False)
    stats = "\n".join(f"- {line}" for line in [f"template: {data.template.name}", *data.stats.lines()])
    runs: list[tuple[str, str | None]] = []
    for i, sample in enumerate(data.train[:max(1, min(int(n), MAX_SAMPLES_SHOWN))]):
        runs.append((f"\n── {i + 1} / {len(data.train)}: {len(sample)} tokens ──\n", None))
        for new, supervised, ids in _runs(sample):
            if new:
                runs.append(("\n⟪next sample⟫\n", None))
            text = tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
            runs.append((text, SUPERVISED if supervised else None))
    return stats, runs


def save_upload(ws: Workspace, temp_path: str) -> str:
    """Copy an uploaded file into the workspace's uploads/ folder; returns its workspace-relative path."""
    source = Path(temp_path)
    if source.stat().st_size > MAX_UPLOAD_BYTES:
        raise WorkspaceError(f"upload: {source.stat().st_size:,} bytes, more than the {MAX_UPLOAD_BYTES:,} allowed")
    name = re.sub(r"[^A-Za-z0-9._-]", "_", source.name).lstrip(".") or "upload"
    if not name.endswith(DATA_SUFFIXES):
        raise WorkspaceError(f"upload: {source.name}: expected one of {', '.join(DATA_SUFFIXES)}")
    dest = ws.resolve(f"uploads/{name}", "upload")
    dest.parent.mkdir(parents=True, exist_ok=True)
    stem, suffix, k = dest.stem, dest.suffix, 1
    while dest.exists():
        dest, k = dest.with_name(f"{stem}-{k}{suffix}"), k + 1
    shutil.copyfile(source, dest)
    return ws.relative(dest)


def build(ctx: Context) -> None:
    with gr.Row():
        with gr.Column(scale=2):
            dataset = gr.Dropdown(label=ctx.text("data.file"), choices=ctx.ws.files(DATA_SUFFIXES),
                                  value=None, allow_custom_value=True, elem_id="data-file")
            upload = gr.File(label=ctx.text("data.upload"), file_types=list(DATA_SUFFIXES), elem_id="data-upload")
            model = gr.Textbox(label=ctx.text("data.model"), value="demo://llama", elem_id="data-model")
            fmt = gr.Dropdown(label=ctx.text("data.format"), choices=FORMATS, value="auto", elem_id="data-format")
            template = gr.Textbox(label=ctx.text("data.template"), value="auto", elem_id="data-template")
            max_length = gr.Number(label="data.max_length", value=1024, precision=0, minimum=8, maximum=1 << 20)
            train_on = gr.Dropdown(label="data.train_on", choices=["assistant", "all", "last"], value="assistant")
            n = gr.Slider(1, MAX_SAMPLES_SHOWN, value=3, step=1, label=ctx.text("data.samples_n"))
            for c, key in ((dataset, "data.file"), (upload, "data.upload"), (model, "data.model"),
                           (fmt, "data.format"), (template, "data.template"), (n, "data.samples_n")):
                ctx.labels.add(c, key)
            show = ctx.button("data.preview", variant="primary", elem_id="data-preview")
        with gr.Column(scale=3):
            error = gr.Markdown(elem_id="data-error")
            stats = gr.Markdown(elem_id="data-stats")
            samples = gr.HighlightedText(label=ctx.text("data.rendered"), color_map={SUPERVISED: "green"},
                                         show_legend=True, elem_id="data-samples")
            ctx.labels.add(samples, "data.rendered")

    def do_upload(file: Any, lang: str) -> list[Any]:
        if file is None:
            return [gr.update(), ""]
        try:
            rel = save_upload(ctx.ws, file if isinstance(file, str) else file.name)
        except LoratuneError as e:
            return [gr.update(), error_box(str(e))]
        return [gr.update(choices=ctx.ws.files(DATA_SUFFIXES), value=rel), ""]

    upload.upload(do_upload, [upload, ctx.lang], [dataset, error])

    def do_preview(*args: Any) -> list[Any]:
        *values, lang = args
        try:
            text, runs = preview_data(ctx.ws, *values)
        except LoratuneError as e:
            return [error_box(str(e)), "", None]
        return ["", f"{t('data.stats', lang)}\n\n{text}", runs]

    ctx.refresh(lambda: gr.update(choices=ctx.ws.files(DATA_SUFFIXES)), [], [dataset])
    show.click(do_preview, [dataset, model, fmt, template, max_length, train_on, n, ctx.lang], [error, stats, samples])
