"""The Evaluate tab: run `loratune eval` on an eval YAML of the workspace and show its report.md.

The YAML (picked from the workspace and editable in the page) is validated as the CLI validates it
(`load_eval_config`), every path in it goes through the workspace gate, and then `loratune eval` runs as a
job. A judge (`judge.prompts`) is refused here: it sends an API key from this machine's environment to
`judge.base_url`, which a page must not be able to choose; run judged evals from the CLI.
The handlers (`pick_config`, `run_eval`, `follow_eval`) are module functions of the context, so tests drive
the tab without a browser.
"""

from __future__ import annotations

from typing import Any

import gradio as gr

from loratune.errors import LoratuneError
from loratune.ui.context import Context, error_box
from loratune.ui.i18n import t
from loratune.ui.jobs import Job
from loratune.ui.paths import MAX_YAML_CHARS, Workspace, WorkspaceError, check_text
from loratune.ui.training import check_paths


def start_eval(ctx: Context, text: str) -> Job:
    from loratune.eval.config import load_eval_config

    check_text(text, "eval config", MAX_YAML_CHARS)
    job_id = ctx.jobs.new_id("eval", "eval")
    path = ctx.jobs.config_path(job_id)
    path.write_text(text, encoding="utf-8")
    cfg = load_eval_config(path)
    if cfg.judge.prompts:
        raise WorkspaceError("judge.prompts: the web UI does not run the judge (it sends an API key to "
                             "judge.base_url); run judged evals with `loratune eval`")
    check_paths(cfg, ctx.ws)
    out = ctx.ws.resolve(cfg.output.dir, "output.dir")
    return ctx.jobs.start("eval", ["eval", str(path.relative_to(ctx.ws.root))], out, job_id)


def report_of(ws: Workspace, job: Job) -> str:
    path = ws.resolve(job.target, "output.dir") / "report.md"
    return path.read_text(encoding="utf-8") if path.is_file() else ""


def pick_config(ctx: Context, path: str, lang: str) -> list[Any]:
    """[error, YAML text] of the eval config file `path` of the workspace (the editor's new contents)."""
    try:
        return ["", ctx.ws.resolve(path, t("eval.file", lang), kind="file").read_text(encoding="utf-8")]
    except (LoratuneError, UnicodeDecodeError) as e:
        return [error_box(str(e)), gr.update()]


def run_eval(ctx: Context, config_text: str, lang: str) -> list[Any]:
    """[error, job id]: the editor's YAML started as `loratune eval`, or the error at its start."""
    try:
        return ["", start_eval(ctx, config_text or "").id]
    except LoratuneError as e:
        return [error_box(str(e)), gr.update()]


def follow_eval(ctx: Context, current: str | None, lang: str) -> list[Any]:
    """[status line, log, report.md] of the eval job `current` (the report once the job has ended)."""
    if not current:
        return [gr.update(), gr.update(), gr.update()]
    job = ctx.jobs.get(current)
    state = ctx.jobs.status(job)
    return [f"{job.target}: {t('status.' + state.split(' ')[0], lang)}", ctx.jobs.log(job),
            report_of(ctx.ws, job) if state != "running" else ""]


def build(ctx: Context) -> None:
    with gr.Row():
        with gr.Column(scale=2):
            source = gr.Dropdown(label=ctx.text("eval.file"), choices=ctx.ws.files((".yaml", ".yml")),
                                 value=None, allow_custom_value=True, elem_id="eval-file")
            ctx.labels.add(source, "eval.file")
            text = gr.Code(language="yaml", label=ctx.text("eval.config"), elem_id="eval-config")
            ctx.labels.add(text, "eval.config")
            run = ctx.button("eval.run", variant="primary", elem_id="eval-run")
        with gr.Column(scale=3):
            error = gr.Markdown(elem_id="eval-error")
            status = gr.Markdown(elem_id="eval-status")
            log = gr.Textbox(label=ctx.text("train.log"), lines=8, max_lines=8, autoscroll=True)
            ctx.labels.add(log, "train.log")
            report = gr.Markdown(elem_id="eval-report")
    job_id = gr.State(None)

    source.change(lambda path, lang: pick_config(ctx, path, lang), [source, ctx.lang], [error, text])
    ctx.refresh(lambda: gr.update(choices=ctx.ws.files((".yaml", ".yml"))), [], [source])
    run.click(lambda config_text, lang: run_eval(ctx, config_text, lang), [text, ctx.lang], [error, job_id])
    ctx.timer.tick(lambda current, lang: follow_eval(ctx, current, lang), [job_id, ctx.lang],
                   [status, log, report], show_progress="hidden")
