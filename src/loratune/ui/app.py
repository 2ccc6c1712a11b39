"""The page: a language switch and six tabs (Train, Data, Chat, Evaluate, Export, Runs) over one workspace.

Each tab is built by its own module (`tab_*.py`) from a shared `Context`; this module lays them out, runs
their page-load handlers (which read the workspace afresh, so a reload finds running jobs), and switches
the language by re-sending the text of every translated component (`Labels`).
"""

from __future__ import annotations

import gradio as gr

from loratune.ui import tab_chat, tab_data, tab_eval, tab_export, tab_runs, tab_train
from loratune.ui.context import Context
from loratune.ui.i18n import LANGUAGES
from loratune.ui.jobs import Jobs
from loratune.ui.paths import Workspace

TABS = (("tab.train", tab_train), ("tab.data", tab_data), ("tab.chat", tab_chat), ("tab.eval", tab_eval),
        ("tab.export", tab_export), ("tab.runs", tab_runs))
POLL_SECONDS = 2.0

CSS = """
.lt-invalid input, .lt-invalid textarea { border-color: #d33 !important; }
.lt-invalid .info, .lt-invalid span[data-testid="block-info"] + div { color: #d33; }
#train-error, #data-error, #chat-error, #eval-error, #export-error { color: #b00; }
"""


def build_app(ws: Workspace, lang: str = "en") -> gr.Blocks:
    with gr.Blocks(title="loratune", analytics_enabled=False) as demo:  # no usage reports leave the machine
        with gr.Row():
            title = gr.Markdown()
            language = gr.Dropdown(choices=[(name, code) for code, name in LANGUAGES.items()], value=lang,
                                   label="Language / 语言 / Язык", elem_id="language", scale=0, min_width=200)
        ctx = Context(ws=ws, jobs=Jobs(ws), lang=language, timer=gr.Timer(POLL_SECONDS), default_lang=lang)
        ctx.labels.add(title, "app.title", "value")
        title.value = ctx.text("app.title")
        with gr.Tabs():
            for key, module in TABS:
                with gr.Tab(ctx.text(key), id=key.split(".")[1], elem_id=f"tab-{key.split('.')[1]}") as tab:
                    ctx.labels.add(tab, key)
                    shown = len(ctx.on_show)
                    module.build(ctx)
                    for fn, inputs, outputs in ctx.on_show[shown:]:
                        tab.select(fn, inputs, outputs, show_progress="hidden")
        switched = language.change(ctx.labels.updates, [language], ctx.labels.components, show_progress="hidden")
        for fn, inputs, outputs in ctx.after_language:  # e.g. an error at a form field, over its new help
            switched = switched.then(fn, inputs, outputs, show_progress="hidden")
        for fn, inputs, outputs in ctx.demo_load:
            demo.load(fn, inputs, outputs, show_progress="hidden")
    return demo
