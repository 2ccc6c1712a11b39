"""User-facing errors.

A `LoratuneError` carries a message written for the person running the command: it names the file,
row, key and what was expected. The CLI prints it as one line and exits non-zero, with no traceback.
Anything else that escapes is a bug in loratune and keeps its traceback.
"""

from __future__ import annotations


class LoratuneError(Exception):
    """An error caused by the user's input (config, data, paths), reported without a traceback."""

    exit_code: int = 2


class ConfigError(LoratuneError):
    """The config is invalid: an unknown key, a wrong type, a bad value or an impossible combination."""


class DataError(LoratuneError):
    """A dataset file is missing or malformed."""


class ModelError(LoratuneError):
    """The model or tokenizer cannot be loaded or does not support what the config asks for."""
