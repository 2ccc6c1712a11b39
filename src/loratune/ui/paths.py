"""The web UI's one gate to the file system: every path a field or a route names is resolved here.

`loratune ui` serves one workspace folder. A path typed into any field (a dataset, an output folder, an
adapter, an eval file) or asked for through a URL is resolved by `Workspace.resolve`, which follows `..`
and symbolic links first and then refuses anything that does not end up inside the workspace root.
Nothing is decoded here: a field's `%2e%2e` is a file literally named so (inside the workspace), and a
route's percent-encoding is decoded once by the web framework before it reaches this function.

Values that are not files are recognised explicitly: `demo://` models and hub ids (`owner/name`, only
when no such folder exists in the workspace) pass through as they are, so a hub model stays usable while
a local path never escapes. Text fields have size limits (`check_text`), so a pasted megabyte does not
reach the tokenizer or the config parser.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from loratune.errors import LoratuneError

MAX_PATH_CHARS = 1024
MAX_TEXT_CHARS = 20_000  # a prompt or a system message
MAX_YAML_CHARS = 200_000  # a whole config
MAX_UPLOAD_BYTES = 64 << 20  # a dataset file uploaded through the page
MAX_BODY_BYTES = 1 << 20  # any other request body (an event's inputs)
MAX_LISTED = 500  # files offered in a picker

HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")
DEMO_SCHEME = "demo://"
UI_DIR = ".loratune-ui"  # the UI's own records (jobs, uploads) inside the workspace


class WorkspaceError(LoratuneError):
    """A field or a URL named a path outside the workspace, or an input over its size limit."""


def check_text(value: str | None, field: str, limit: int = MAX_TEXT_CHARS) -> str:
    """`value` as text, refused with the field's name when it is longer than `limit` characters."""
    text = "" if value is None else str(value)
    if len(text) > limit:
        raise WorkspaceError(f"{field}: {len(text):,} characters, more than the {limit:,} allowed")
    if "\x00" in text:
        raise WorkspaceError(f"{field}: contains a NUL character")
    return text


@dataclass(frozen=True)
class Workspace:
    """The folder the UI may read and write; `root` is absolute with its symbolic links resolved."""

    root: Path

    @classmethod
    def at(cls, folder: str | Path) -> Workspace:
        root = Path(folder).expanduser().resolve()
        if not root.is_dir():
            raise WorkspaceError(f"workspace {root} is not a folder")
        return cls(root)

    def contains(self, path: Path) -> bool:
        return path == self.root or self.root in path.parents

    def resolve(self, value: str | os.PathLike | None, field: str = "path", *, must_exist: bool = False,
                kind: str | None = None) -> Path:
        """The absolute, link-free path `value` names, which must lie inside the workspace.

        Relative values are taken from the workspace root; absolute ones must point into it. `kind` is
        "file" or "dir" to require that (it implies `must_exist`).
        """
        text = check_text(value, field, MAX_PATH_CHARS).strip()
        if not text:
            raise WorkspaceError(f"{field}: empty; name a path inside the workspace {self.root}")
        if text.startswith("~"):
            raise WorkspaceError(f"{field}: {text!r}: home-folder paths are not served; name a path inside the "
                                 f"workspace {self.root}")
        candidate = Path(text)
        real = (candidate if candidate.is_absolute() else self.root / candidate).resolve()
        if not self.contains(real):
            raise WorkspaceError(f"{field}: {text!r} is outside the workspace {self.root}")
        if (must_exist or kind) and not real.exists():
            raise WorkspaceError(f"{field}: {text!r} does not exist in the workspace")
        if kind == "file" and not real.is_file():
            raise WorkspaceError(f"{field}: {text!r} is not a file")
        if kind == "dir" and not real.is_dir():
            raise WorkspaceError(f"{field}: {text!r} is not a folder")
        return real

    def source(self, value: str | None, field: str) -> str:
        """A model, tokenizer or dataset source: `demo://...`, a hub id, or a path inside the workspace.

        Returns what to hand to loratune: the value itself for demo models and hub ids, else the resolved
        path. A hub-id-shaped value that exists in the workspace is the local folder (as loratune reads it).
        """
        text = check_text(value, field, MAX_PATH_CHARS).strip()
        if text.startswith(DEMO_SCHEME) and "/" not in text[len(DEMO_SCHEME):]:
            return text
        if HUB_ID.match(text) and ".." not in text and not (self.root / text).exists() \
                and not os.path.lexists(self.root / text.split("/")[0]):
            return text
        return str(self.resolve(text, field, must_exist=True))

    def relative(self, path: Path) -> str:
        """How a path inside the workspace is shown: relative to the root ("." for the root itself)."""
        return str(path.relative_to(self.root)) if path != self.root else "."

    def files(self, suffixes: tuple[str, ...], under: str = ".", limit: int = MAX_LISTED) -> list[str]:
        """Files inside the workspace with these suffixes (hidden folders and the UI's records skipped)."""
        start = self.resolve(under, "folder", kind="dir")
        found: list[str] = []
        for folder, dirs, names in os.walk(start, followlinks=False):
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            for name in sorted(names):
                if name.endswith(suffixes):
                    path = Path(folder) / name
                    if self.contains(path.resolve()):
                        found.append(self.relative(path))
                        if len(found) >= limit:
                            return found
        return found

    def ui_dir(self, *parts: str) -> Path:
        folder = self.root.joinpath(UI_DIR, *parts)
        folder.mkdir(parents=True, exist_ok=True)
        return folder
