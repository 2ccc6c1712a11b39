"""Optional dependencies of inference: a missing one is a `LoratuneError` naming the extra that brings it.

`loratune serve` needs FastAPI and uvicorn, which `pip install loratune` does not install (they are the
`[serve]` extra). Without them a user would see a `ModuleNotFoundError` traceback from deep in an import;
this turns it into one line saying which module is missing and what to install.
"""

from __future__ import annotations

from loratune.errors import LoratuneError


class MissingExtraError(LoratuneError):
    """An optional dependency of the command being run is not installed."""


def missing_extra(extra: str, error: ModuleNotFoundError) -> MissingExtraError:
    """The error to raise (`from None`) when importing a module of the `extra` extra failed with `error`."""
    module = error.name or str(error)
    return MissingExtraError(f"`loratune {extra}` needs the Python package {module!r}, which is not installed: "
                             f"pip install 'loratune[{extra}]'")
