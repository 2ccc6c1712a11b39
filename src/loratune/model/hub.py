"""Where `model.path` points: a local folder (or a config.json), or a hub id; decided before transformers is asked.

Why: transformers takes anything that is not an existing folder for a hub id. A mistyped local path then
reads "Repo id must be in the form 'repo_name' or 'namespace/repo_name'", and a hub id on a machine
without the network spends half a minute in download retries before failing. Here:

- a path that cannot be a hub id is local, and a missing one is "no such folder: PATH". Hub ids are
  `name` or `namespace/name` of letters, digits, `-`, `_` and `.` (huggingface_hub's `validate_repo_id`);
  anything else (`./m`, `/m`, `~/m`, `a/b/c`, `C:\\m`) can only be a path. A valid id whose first part is
  an existing folder (`models/llama` beside a `models/` folder) is taken as a local path too.
- a hub id is looked up in the local hub cache first. With HF_HUB_OFFLINE set, a model not in the cache
  fails at once. Otherwise one request to the hub's endpoint, with a short timeout and no retries, says
  whether it is reachable; when it is not, a cached model loads from the cache and an uncached one fails
  at once, with a message saying what to do.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

from loratune.errors import ModelError

REACH_TIMEOUT_S = 3.0


@dataclass(frozen=True)
class Source:
    """What to hand to `from_pretrained`: the path or hub id, and whether to stay off the network."""

    path: str
    local_files_only: bool = False


def can_be_hub_id(path: str) -> bool:
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(path)
    except HFValidationError:
        return False
    return True


def looks_local(path: str) -> bool:
    """True when `path` can only mean a file or folder on this machine (see the module docstring)."""
    if Path(path).expanduser().exists() or not can_be_hub_id(path):
        return True
    namespace, slash, _ = path.partition("/")
    return bool(slash) and Path(namespace).is_dir()


@functools.lru_cache(maxsize=4)
def hub_unreachable(endpoint: str) -> str | None:
    """Why the hub at `endpoint` cannot be reached (one request, no retries), or None when it answers."""
    from huggingface_hub import get_session

    try:
        get_session().head(endpoint, timeout=REACH_TIMEOUT_S)  # any HTTP answer means it is reachable
    except Exception as e:  # noqa: BLE001 - whatever the HTTP client raises, the answer is "unreachable"
        return f"{type(e).__name__}: {e}".splitlines()[0]
    return None


def _cached(repo_id: str, revision: str | None) -> bool:
    from huggingface_hub import try_to_load_from_cache

    return isinstance(try_to_load_from_cache(repo_id, "config.json", revision=revision), str)


def locate(path: str, revision: str | None = None, *, config_file_ok: bool = False) -> Source:
    """Check `path` (already resolved from demo://) and say how to load it; raise `ModelError` when it cannot be.

    `config_file_ok`: a path to a config.json file is accepted (planning needs nothing more); loading
    weights needs the folder.
    """
    if looks_local(path):
        p = Path(path).expanduser()
        if p.is_file():
            if config_file_ok and p.suffix == ".json":
                return Source(str(p))
            raise ModelError(f"model.path {path!r} is a file; give the model's folder (the one holding "
                             "config.json, the weights and the tokenizer)")
        if not p.is_dir():
            raise ModelError(f"no such folder: {path}")
        return Source(str(p))
    from huggingface_hub import constants, is_offline_mode

    if _cached(path, revision):
        if is_offline_mode() or hub_unreachable(constants.ENDPOINT) is None:
            return Source(path)  # transformers takes the cache itself when offline
        return Source(path, local_files_only=True)
    if is_offline_mode():
        why = "the hub is off (HF_HUB_OFFLINE is set)"
    else:
        reason = hub_unreachable(constants.ENDPOINT)
        if reason is None:
            return Source(path)
        why = f"the hub cannot be reached ({constants.ENDPOINT}: {reason})"
    plan_hint = ", or to a copy of its config.json to plan" if config_file_ok else ""
    raise ModelError(f"model.path {path!r} is a hub id that is not in the local cache, and {why}. Download it "
                     f"where the hub is reachable (`hf download {path}`), or set model.path to a local folder"
                     f"{plan_hint}")
