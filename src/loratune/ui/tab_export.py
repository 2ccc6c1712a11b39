"""The Export tab: `loratune export` as a job: merge an adapter into its base, verify, publish.

The export itself verifies before it publishes (merged vs adapter logits, the reload; nothing is written
to the destination when a check fails), and its report is the job's log, shown here as it comes.
"""

from __future__ import annotations

from typing import Any

import gradio as gr

from loratune.errors import LoratuneError
from loratune.ui.context import Context, error_box
from loratune.ui.i18n import t
from loratune.ui.jobs import Job
from loratune.ui.tab_chat import adapter_choices

DTYPES = ["bf16", "fp16", "fp32"]


def start_export(ctx: Context, adapter: str, out: str, dtype: str, min_agreement: float, overwrite: bool) -> Job:
    source = ctx.ws.resolve(adapter, "adapter", kind="dir")
    dest = ctx.ws.resolve(out, "--out")
    if dest == ctx.ws.root or dest == source or source in dest.parents:
        raise LoratuneError(f"--out: {out!r} must be a folder of its own, outside the adapter folder")
    if dtype not in DTYPES:
        raise LoratuneError(f"--dtype: got {dtype!r}, expected one of {', '.join(DTYPES)}")
    if min_agreement is None or not 0 <= float(min_agreement) <= 1:
        raise LoratuneError(f"--min-agreement: got {min_agreement!r}, expected a number in [0, 1]")
    args = ["export", ctx.ws.relative(source), "--out", ctx.ws.relative(dest), "--dtype", dtype,
            "--min-agreement", str(float(min_agreement)), *(["--overwrite"] if overwrite else [])]
    return ctx.jobs.start("export", args, dest)


def build(ctx: Context) -> None:
    with gr.Row():
        with gr.Column(scale=2):
            adapter = gr.Dropdown(label=ctx.text("export.adapter"), choices=adapter_choices(ctx.ws),
                                  allow_custom_value=True, elem_id="export-adapter")
            out = gr.Textbox(label=ctx.text("export.out"), value="exports/merged", elem_id="export-out")
            dtype = gr.Dropdown(label="--dtype", choices=DTYPES, value="bf16", elem_id="export-dtype")
            min_agreement = gr.Number(label="--min-agreement", value=0.9, minimum=0, maximum=1)
            overwrite = gr.Checkbox(label="--overwrite", value=False)
            ctx.labels.add(adapter, "export.adapter")
            ctx.labels.add(out, "export.out")
            run = ctx.button("export.run", variant="primary", elem_id="export-run")
        with gr.Column(scale=3):
            error = gr.Markdown(elem_id="export-error")
            status = gr.Markdown(elem_id="export-status")
            log = gr.Textbox(label=ctx.text("export.report"), lines=14, max_lines=14, elem_id="export-log")
            ctx.labels.add(log, "export.report")
    job_id = gr.State(None)

    def do_run(adapter_value: str, out_value: str, dtype_value: str, agreement: float, over: bool,
               lang: str) -> list[Any]:
        try:
            return ["", start_export(ctx, adapter_value or "", out_value, dtype_value, agreement, over).id]
        except LoratuneError as e:
            return [error_box(str(e)), gr.update()]

    run.click(do_run, [adapter, out, dtype, min_agreement, overwrite, ctx.lang], [error, job_id])

    def follow(current: str | None, lang: str) -> list[Any]:
        if not current:
            return [gr.update(), gr.update()]
        job = ctx.jobs.get(current)
        return [f"{job.target}: {t('status.' + ctx.jobs.status(job).split(' ')[0], lang)}", ctx.jobs.log(job)]

    ctx.timer.tick(follow, [job_id, ctx.lang], [status, log], show_progress="hidden")
    ctx.refresh(lambda: gr.update(choices=adapter_choices(ctx.ws)), [], [adapter])
