"""The Runs tab: every run folder of the workspace, and a few of them compared side by side.

The table lists each run's step, last train loss and whether its adapter is written; the chosen runs'
loss curves share one plot (a colour per run), and their configs and sample answers (before and after
training, from samples.json) stand in columns.
"""

from __future__ import annotations

from typing import Any

import gradio as gr
import pandas as pd

from loratune.ui import runs
from loratune.ui.context import Context
from loratune.ui.i18n import t

COMPARED = 3


def table(ctx: Context, lang: str) -> pd.DataFrame:
    rows = [[r.name, r.step, None if r.loss is None else round(r.loss, 4), "✓" if r.has_adapter else ""]
            for r in runs.find_runs(ctx.ws)]
    return pd.DataFrame(rows, columns=[t("runs.name", lang), t("runs.step", lang), t("runs.loss", lang),
                                       t("runs.adapter", lang)])


def curves(ctx: Context, names: list[str]) -> Any:
    return runs.figure({name: runs.metrics(ctx.ws.resolve(name, "run", kind="dir")) for name in names})


def samples_markdown(ctx: Context, name: str, lang: str) -> str:
    items = runs.samples(ctx.ws.resolve(name, "run", kind="dir"))
    if not items:
        return t("runs.no_samples", lang)
    out = []
    for s in items:
        out += [f"**{t('runs.prompt', lang)}:** {s.get('prompt', '')}",
                f"- {t('runs.before', lang)}: {s.get('before') or '–'}",
                f"- {t('runs.after', lang)}: {s.get('after') or '–'}", ""]
    return "\n".join(out)


def build(ctx: Context) -> None:
    refresh = ctx.button("runs.refresh", elem_id="runs-refresh")
    listing = gr.Dataframe(table(ctx, ctx.default_lang), interactive=False, elem_id="runs-table")
    chosen = gr.Dropdown(label=ctx.text("runs.compare"), choices=[r.name for r in runs.find_runs(ctx.ws)],
                         multiselect=True, max_choices=COMPARED, elem_id="runs-compare")
    ctx.labels.add(chosen, "runs.compare")
    plot = gr.Plot(elem_id="runs-plot")
    columns = []
    with gr.Row():
        for i in range(COMPARED):
            with gr.Column(visible=False) as col:
                title = gr.Markdown()
                config = gr.Code(language="yaml", label="loratune.yaml")
                answers = gr.Markdown()
            columns.append((col, title, config, answers))

    def do_refresh(lang: str) -> list[Any]:
        return [table(ctx, lang), gr.update(choices=[r.name for r in runs.find_runs(ctx.ws)])]

    refresh.click(do_refresh, [ctx.lang], [listing, chosen])

    def compare(names: list[str] | None, lang: str) -> list[Any]:
        names = list(names or [])[:COMPARED]
        out: list[Any] = [curves(ctx, names)]
        for i, (_, _, _, _) in enumerate(columns):
            if i < len(names):
                folder = ctx.ws.resolve(names[i], "run", kind="dir")
                out += [gr.update(visible=True), f"### {names[i]}", runs.config_text(folder),
                        samples_markdown(ctx, names[i], lang)]
            else:
                out += [gr.update(visible=False), "", "", ""]
        return out

    flat = [c for column in columns for c in column]
    chosen.change(compare, [chosen, ctx.lang], [plot, *flat])
    ctx.refresh(do_refresh, [ctx.lang], [listing, chosen])
