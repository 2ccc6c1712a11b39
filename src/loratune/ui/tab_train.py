"""The Train tab: the config form (every schema key), its YAML, the memory plan, and the training jobs.

Each change to a field re-validates the whole form: the YAML and the plan follow it, and a `ConfigError`
is shown under the field whose key it names (the field's info line turns into the CLI's message). Launch
writes the YAML and starts `loratune train`; the job list is read from the workspace, so after a page
reload the run is found again and followed (the timer reads its metrics.jsonl and log).
"""

from __future__ import annotations

import hashlib
import tempfile
from pathlib import Path
from typing import Any

import gradio as gr

from loratune.config import load_config
from loratune.errors import LoratuneError
from loratune.ui import form, runs, training
from loratune.ui.config_help_i18n import section_title
from loratune.ui.context import Context, error_box
from loratune.ui.i18n import t
from loratune.ui.paths import MAX_YAML_CHARS, check_text

SECTIONS = tuple(dict.fromkeys(f.section for f in form.FIELDS))  # the schema's sections, in its order
OPEN = ("model", "data", "train", "output")


def _widget(f: form.Field, value: Any, lang: str) -> Any:
    common = {"label": f.key, "info": form.info(f, lang), "elem_id": "f-" + f.key.replace(".", "-")}
    if f.kind == "bool":
        return gr.Checkbox(value=value, **common)
    if f.kind == "choice":
        return gr.Dropdown(choices=list(f.choices), value=value, **common)
    if f.kind in ("int", "float"):
        return gr.Number(value=value, precision=0 if f.kind == "int" else None, **common)
    lines = 1 if f.kind == "text" else 2
    return gr.Textbox(value=value, lines=lines, max_lines=12, max_length=MAX_YAML_CHARS // 10, **common)


def plan_text(cfg) -> str:
    """`loratune plan`'s table for this config (on the device this machine would train on)."""
    from loratune.model.memory import (
        WouldNotFit,
        default_device,
        describe,
        plan_run,
        render,
    )

    try:
        return describe(plan_run(cfg, device=default_device()), cfg)
    except WouldNotFit as e:
        return render(e.plan) + f"\n{e}"


def job_choices(ctx: Context) -> list[tuple[str, str]]:
    return [(f"{j.target} · {j.id}", j.id) for j in ctx.jobs.all() if j.kind == "train"]


def build(ctx: Context) -> None:
    defaults = form.default_values()
    defaults["model.path"] = "demo://llama"
    widgets: dict[str, Any] = {}
    with gr.Row():
        with gr.Column(scale=3):
            with gr.Row():
                source = gr.Dropdown(label=ctx.text("train.load_from"), choices=ctx.ws.files((".yaml", ".yml")),
                                     value=None, allow_custom_value=True, elem_id="train-load-path", scale=4)
                ctx.labels.add(source, "train.load_from")
                load = ctx.button("train.load", scale=1, elem_id="train-load")
            for section in SECTIONS:
                fields = [f for f in form.FIELDS if f.section == section]
                with gr.Accordion(section_title(section, ctx.default_lang), open=section in OPEN) as accordion:
                    for f in fields:
                        widgets[f.key] = _widget(f, defaults[f.key], ctx.default_lang)
                        ctx.labels.add_text(widgets[f.key], lambda lang, f=f: form.info(f, lang), "info")
                ctx.labels.add_text(accordion, lambda lang, section=section: section_title(section, lang))
        with gr.Column(scale=2):
            error = gr.Markdown(elem_id="train-error")
            with gr.Row():
                launch = ctx.button("train.launch", variant="primary", elem_id="train-launch")
                stop = ctx.button("train.stop", variant="stop", elem_id="train-stop")
                resume = ctx.button("train.resume", elem_id="train-resume")
            job = gr.Dropdown(label=ctx.text("train.job"), choices=job_choices(ctx), elem_id="train-job")
            ctx.labels.add(job, "train.job")
            status = gr.Markdown(elem_id="train-status")
            plot = gr.Plot(label=ctx.text("train.curve"), elem_id="train-plot")
            ctx.labels.add(plot, "train.curve")
            log = gr.Textbox(label=ctx.text("train.log"), lines=8, max_lines=8, autoscroll=True, elem_id="train-log")
            ctx.labels.add(log, "train.log")
            yaml_box = gr.Code(language="yaml", label=ctx.text("train.yaml"), elem_id="train-yaml")
            ctx.labels.add(yaml_box, "train.yaml")
            download = gr.DownloadButton(ctx.text("train.download"), elem_id="train-download")
            ctx.labels.add(download, "train.download")
            plan = gr.Code(label=ctx.text("train.plan"), elem_id="train-plan")
            ctx.labels.add(plan, "train.plan")

    inputs = [widgets[f.key] for f in form.FIELDS]
    error_field = gr.State(None)

    def check(*args: Any) -> list[Any]:
        *values, lang, previous = args
        by_key = dict(zip((f.key for f in form.FIELDS), values))
        message, bad, yaml_text, plan_out, file = "", None, gr.update(), gr.update(), gr.update()
        try:
            cfg = training.checked_config(by_key, ctx.ws)
            yaml_text = form.yaml_of(by_key)
            file = _yaml_file(ctx, yaml_text)
            plan_out = _plan_or_message(cfg)
        except LoratuneError as e:
            message, bad = str(e), form.field_of_error(str(e))
        updates = {k: gr.update() for k in form.BY_KEY}
        if previous and previous != bad:
            updates[previous] = gr.update(info=form.info(form.BY_KEY[previous], lang), elem_classes=[])
        if bad:
            updates[bad] = gr.update(info=f"⚠ {message}", elem_classes=["lt-invalid"])
        return [error_box(message), yaml_text, file, plan_out, bad, *updates.values()]

    outputs = [error, yaml_box, download, plan, error_field, *inputs]
    for w in inputs:
        w.input(check, [*inputs, ctx.lang, error_field], outputs, trigger_mode="always_last", show_progress="hidden")

    def load_file(path: str, lang: str, *current: Any) -> list[Any]:
        try:
            cfg = load_config(ctx.ws.resolve(path, ctx.text("train.load_from"), kind="file"))
        except LoratuneError as e:
            return [error_box(str(e)), *[gr.update() for _ in current]]
        values = form.values_of(cfg)
        return ["", *[values[f.key] for f in form.FIELDS]]

    load.click(load_file, [source, ctx.lang, *inputs], [error, *inputs]).then(
        check, [*inputs, ctx.lang, error_field], outputs)

    def do_launch(*args: Any) -> list[Any]:
        *values, _lang = args
        try:
            started = training.launch(dict(zip((f.key for f in form.FIELDS), values)), ctx.ws, ctx.jobs)
        except LoratuneError as e:
            return [error_box(str(e)), gr.update()]
        return ["", gr.update(choices=job_choices(ctx), value=started.id)]

    launch.click(do_launch, [*inputs, ctx.lang], [error, job])

    def do_stop(job_id: str | None, lang: str) -> str:
        if not job_id:
            return error_box(t("train.no_job", lang))
        stopped = ctx.jobs.stop(ctx.jobs.get(job_id))
        return t("train.stopping" if stopped else "train.not_running", lang)

    stop.click(do_stop, [job, ctx.lang], [error])

    def do_resume(job_id: str | None, lang: str) -> list[Any]:
        if not job_id:
            return [error_box(t("train.no_job", lang)), gr.update()]
        try:
            started = training.resume(ctx.jobs.get(job_id), ctx.ws, ctx.jobs)
        except LoratuneError as e:
            return [error_box(str(e)), gr.update()]
        return ["", gr.update(choices=job_choices(ctx), value=started.id)]

    resume.click(do_resume, [job, ctx.lang], [error, job])

    shown = gr.State(None)  # what the page shows already: the timer sends only what changed

    def follow(job_id: str | None, lang: str, before: tuple | None) -> list[Any]:
        try:
            current = ctx.jobs.get(job_id) if job_id else None
        except LoratuneError:
            current = None
        if current is None:
            return ["", None, "", None]
        folder = ctx.ws.resolve(current.target, "output.dir")
        points, last, text = runs.metrics(folder), runs.run_info(ctx.ws, folder), ctx.jobs.log(current)
        state = ctx.jobs.status(current).split(" ")[0]
        line = t("train.progress", lang, run=current.target, status=t("status." + state, lang),
                 step=last.step if last.step is not None else "–",
                 loss=f"{last.loss:.4f}" if last.loss is not None else "–")
        now = (job_id, lang, state, len(points), len(text), text[-200:])
        was = tuple(before) if before else None
        if was == now:
            return [gr.update(), gr.update(), gr.update(), before]
        same_points = was is not None and was[0] == job_id and was[3] == len(points)
        return [line, gr.update() if same_points else runs.figure({"": points}), text, now]

    ctx.timer.tick(follow, [job, ctx.lang, shown], [status, plot, log, shown], show_progress="hidden")
    job.change(follow, [job, ctx.lang, gr.State(None)], [status, plot, log, shown], show_progress="hidden")

    def on_load() -> Any:
        choices = job_choices(ctx)
        running = [c for c in ctx.jobs.all() if c.kind == "train" and ctx.jobs.status(c) == "running"]
        value = running[0].id if running else (choices[0][1] if choices else None)
        return gr.update(choices=choices, value=value)

    ctx.demo_load.append((on_load, [], [job]))
    ctx.demo_load.append((check, [*inputs, ctx.lang, error_field], outputs))
    # the language switch re-sends every field's help; a field showing an error gets its error back
    ctx.after_language.append((check, [*inputs, ctx.lang, gr.State(None)], outputs))


def _yaml_file(ctx: Context, text: str) -> str:
    """The YAML as a file for the download button, in the system's temporary folder (which Gradio serves files
    from; nothing of the workspace is exposed for it), named by its contents."""
    check_text(text, "config", MAX_YAML_CHARS)
    folder = Path(tempfile.gettempdir()) / "loratune-ui" / hashlib.sha256(text.encode()).hexdigest()[:16]
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "loratune-train.yaml"
    path.write_text(text, encoding="utf-8")
    return str(path)


def _plan_or_message(cfg) -> str:
    try:
        return plan_text(cfg)
    except LoratuneError as e:
        return str(e)
