"""What every tab of the UI is built with: the workspace, its jobs, the language and the translated labels.

`Labels` remembers each component whose text is a catalogue entry (a label, a button's text, a heading),
so that switching the language re-sends exactly those texts (`updates`), in the order of `components`.
A text that is not a catalogue entry (a config section's title, a key's help) is added as a function of the
language (`add_text`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import gradio as gr

from loratune.ui.i18n import t
from loratune.ui.jobs import Jobs
from loratune.ui.paths import Workspace


@dataclass
class Labels:
    # (component, attribute, catalogue key or a function of the language giving the text)
    items: list[tuple[Any, str, str | Callable[[str], str]]] = field(default_factory=list)

    def add(self, component: Any, key: str, attr: str = "label") -> Any:
        self.items.append((component, attr, key))
        return component

    def add_text(self, component: Any, text: Callable[[str], str], attr: str = "label") -> Any:
        self.items.append((component, attr, text))
        return component

    @property
    def components(self) -> list[Any]:
        return [c for c, _, _ in self.items]

    def updates(self, lang: str) -> list[Any]:
        return [gr.update(**{attr: t(key, lang) if isinstance(key, str) else key(lang)})
                for _, attr, key in self.items]


@dataclass
class Context:
    ws: Workspace
    jobs: Jobs
    lang: Any  # the language drop-down (an input of every handler that writes a message)
    timer: Any  # ticks while the page is open: progress, logs
    labels: Labels = field(default_factory=Labels)
    default_lang: str = "en"
    demo_load: list[tuple[Any, list, list]] = field(default_factory=list)  # (fn, inputs, outputs) run on page load
    on_show: list[tuple[Any, list, list]] = field(default_factory=list)  # run when the tab being built is selected
    after_language: list[tuple[Any, list, list]] = field(default_factory=list)  # run after the labels switched

    def refresh(self, fn: Any, inputs: list, outputs: list) -> None:
        """Run `fn` on page load and whenever this tab is selected (lists of runs, files)."""
        self.demo_load.append((fn, inputs, outputs))
        self.on_show.append((fn, inputs, outputs))

    def text(self, key: str) -> str:
        return t(key, self.default_lang)

    def button(self, key: str, **kw: Any) -> Any:
        return self.labels.add(gr.Button(self.text(key), **kw), key, "value")

    def heading(self, key: str) -> Any:
        return self.labels.add(gr.Markdown(f"{self.text(key)}"), key, "value")


def error_box(message: str) -> str:
    """An error as the page shows it (Markdown), one paragraph."""
    return f"**⚠ {message}**" if message else ""
