"""The Chat tab: the base model and up to `SLOTS - 1` trained adapters answer the same prompt side by side.

Models load through `infer.load_engine`, as `loratune chat` and `serve` load them: the adapters on their
common base (each with the chat template it was trained with), the base itself under the name `base`.
Answers stream token by token, one model after the other (the engine generates one request at a time);
the sampling settings are `SamplingParams`, validated as the CLI validates them. One engine is kept
loaded at a time (loading another releases the previous one).
"""

from __future__ import annotations

import queue
import threading
from pathlib import Path
from typing import Any

import gradio as gr

from loratune.errors import LoratuneError
from loratune.infer.engine import Delta
from loratune.infer.sampling import SamplingParams
from loratune.ui.context import Context, error_box
from loratune.ui.i18n import t
from loratune.ui.paths import MAX_TEXT_CHARS, Workspace, check_text
from loratune.ui.runs import find_runs

SLOTS = 3
MAX_NEW_TOKENS = 2048
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


def adapter_identity(folder: Path) -> tuple[tuple[str, int, int], ...]:
    """(file, size, mtime in ns) of an adapter folder's files: changes when the run writes a new adapter."""
    out = []
    for name in ADAPTER_FILES:
        path = folder / name
        st = path.stat() if path.is_file() else None
        out.append((name, st.st_size if st else -1, st.st_mtime_ns if st else -1))
    return tuple(out)


class Loaded:
    """The one engine the UI holds, keyed by what it was loaded from."""

    def __init__(self) -> None:
        self.key: tuple | None = None
        self.engine = None
        self.lock = threading.Lock()

    def load(self, ws: Workspace, base: str, adapters: list[str]) -> Any:
        if len(adapters) > SLOTS - 1:
            raise LoratuneError(f"at most {SLOTS - 1} adapters side by side, got {len(adapters)}")
        folders = [ws.resolve(a, "adapter", kind="dir") for a in adapters]
        sources = [f"{display_name(a)}={folder}" for a, folder in zip(adapters, folders)] \
            or [ws.source(base, "model")]
        key = (*sources, *(adapter_identity(Path(folder)) for folder in folders))
        with self.lock:
            if self.key != key:
                from loratune.infer.load import load_engine

                self.engine, self.key = None, None
                self.engine, self.key = load_engine(sources), key
            return self.engine


def display_name(run: str) -> str:
    """An adapter's name in the engine: its workspace path with `/` as `-` (names may not hold `/`)."""
    return run.replace("/", "-")


def adapter_choices(ws: Workspace) -> list[str]:
    return [r.name for r in find_runs(ws) if r.has_adapter]


def answer_stream(engine, name: str, messages: list[dict], params: SamplingParams):
    """The text of `name`'s answer so far, after each streamed piece.

    The engine's generator runs to its end on one thread of its own (it holds the engine's lock, which belongs
    to the thread that took it, while it generates); Gradio may resume this generator on any of its worker
    threads, so the pieces cross over through a queue.
    """
    pieces: queue.Queue = queue.Queue()

    def produce() -> None:
        try:
            for event in engine.chat(messages, params, name):
                if isinstance(event, Delta):
                    pieces.put(event.text)
        except BaseException as e:  # handed to the consumer, which raises it where Gradio reports it
            pieces.put(e)
        pieces.put(None)

    threading.Thread(target=produce, daemon=True).start()
    text = ""
    while (piece := pieces.get()) is not None:
        if isinstance(piece, BaseException):
            raise piece
        text += piece
        yield text


def build(ctx: Context) -> None:
    loaded = Loaded()
    with gr.Row():
        with gr.Column(scale=1):
            base = gr.Textbox(label=ctx.text("chat.base"), value="demo://llama", elem_id="chat-base")
            adapters = gr.Dropdown(label=ctx.text("chat.adapters"), choices=adapter_choices(ctx.ws), multiselect=True,
                                   max_choices=SLOTS - 1, elem_id="chat-adapters")
            load = ctx.button("chat.load", elem_id="chat-load")
            loaded_md = gr.Markdown(elem_id="chat-loaded")
            system = gr.Textbox(label=ctx.text("chat.system"), lines=2, max_length=MAX_TEXT_CHARS)
            temperature = gr.Slider(0, 2, value=0.0, step=0.05, label="temperature")
            top_p = gr.Slider(0.05, 1, value=1.0, step=0.05, label="top_p")
            top_k = gr.Number(value=0, precision=0, minimum=0, label="top_k")
            max_tokens = gr.Slider(1, MAX_NEW_TOKENS, value=64, step=1, label="max_tokens", elem_id="chat-max_tokens")
            seed = gr.Number(value=0, precision=0, label="seed")
            for c, key in ((base, "chat.base"), (adapters, "chat.adapters"), (system, "chat.system")):
                ctx.labels.add(c, key)
        with gr.Column(scale=3):
            error = gr.Markdown(elem_id="chat-error")
            with gr.Row():
                boxes = [gr.Chatbot(label="base" if i == 0 else f"adapter {i}", visible=i == 0, height=320,
                                    elem_id=f"chat-answer-{i}") for i in range(SLOTS)]
            prompt = gr.Textbox(label=ctx.text("chat.prompt"), lines=2, max_length=MAX_TEXT_CHARS, elem_id="chat-prompt")
            ctx.labels.add(prompt, "chat.prompt")
            with gr.Row():
                send = ctx.button("chat.send", variant="primary", elem_id="chat-send")
                clear = ctx.button("chat.clear", elem_id="chat-clear")
    names = gr.State([])

    def do_load(base_value: str, chosen: list[str] | None, lang: str) -> list[Any]:
        try:
            engine = loaded.load(ctx.ws, base_value, list(chosen or []))
        except LoratuneError as e:
            return [error_box(str(e)), [], *[gr.update() for _ in boxes]]
        shown = engine.names[:SLOTS]
        updates = [gr.update(visible=i < len(shown), label=shown[i] if i < len(shown) else "", value=[])
                   for i in range(SLOTS)]
        return ["", shown, *updates]

    load.click(do_load, [base, adapters, ctx.lang], [error, names, *boxes]).then(
        lambda lang, shown: t("chat.loaded", lang, names=", ".join(shown)) if shown else "", [ctx.lang, names],
        [loaded_md])

    def do_send(text: str, system_text: str, temp: float, p: float, k: float, max_new: float, seed_value: float,
                shown: list[str], lang: str, *histories: list):
        histories = [list(h or []) for h in histories]
        try:
            check_text(text, t("chat.prompt", lang))
            check_text(system_text, t("chat.system", lang))
            if not shown or loaded.engine is None:
                raise LoratuneError(t("chat.load_first", lang))
            if not text.strip():
                raise LoratuneError(t("chat.empty", lang))
            params = SamplingParams(max_new_tokens=int(max_new), temperature=float(temp), top_p=float(p),
                                    top_k=int(k or 0), seed=int(seed_value) if seed_value else None).validate()
        except LoratuneError as e:
            yield [error_box(str(e)), *histories]
            return
        for i, name in enumerate(shown):
            turns = [m for m in histories[i] if m.get("role") in ("user", "assistant")]
            messages = ([{"role": "system", "content": system_text}] if system_text.strip() else []) + \
                [{"role": m["role"], "content": str(m["content"])} for m in turns] + [{"role": "user", "content": text}]
            histories[i] = turns + [{"role": "user", "content": text}, {"role": "assistant", "content": ""}]
            try:
                for so_far in answer_stream(loaded.engine, name, messages, params):
                    histories[i][-1] = {"role": "assistant", "content": so_far}
                    yield ["", *histories]
            except LoratuneError as e:
                yield [error_box(str(e)), *histories]
                return
        yield ["", *histories]

    send.click(do_send, [prompt, system, temperature, top_p, top_k, max_tokens, seed, names, ctx.lang, *boxes],
               [error, *boxes])
    clear.click(lambda: [[] for _ in boxes], [], boxes)
    ctx.refresh(lambda: gr.update(choices=adapter_choices(ctx.ws)), [], [adapters])
