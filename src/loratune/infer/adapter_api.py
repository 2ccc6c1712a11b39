"""Adapters loaded and unloaded while `loratune serve` runs: `/v1/adapters`.

    POST   /v1/adapters          {"name": "support", "path": "/srv/runs/support"}   serve a run folder as `name`
    GET    /v1/adapters          the adapters served: name, folder, whether on the device now
    DELETE /v1/adapters/{name}   stop serving it (requests running with it finish first)

`/v1/models` lists what is served at every moment, so a loaded adapter appears there and an unloaded one
leaves. Folders may be loaded only from inside the directories the server was started with
(`loratune serve --adapter-dir DIR`, repeatable; the path is resolved, symlinks followed, before the check);
without one the routes answer 403. Loading reads and checks the folder first (in a worker thread, so
generation goes on): a run folder of `loratune train`, trained on the served base, LoRA weights that fit the
decoder's layers. Then it is put on the device, within the LRU of `--max-adapters`.

Errors are OpenAI's error JSON: 403 outside the allowed directories or with loading off, 400 for a path that is
no adapter run folder or an adapter that does not fit (another base, modules the decoder lacks, wrong shapes),
409 for a name already served, 404 for an unknown name, 400 for unloading the base.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

from fastapi import FastAPI, Request
from pydantic import Field
from starlette.concurrency import run_in_threadpool

from loratune.errors import LoratuneError
from loratune.infer.asgi import read_json
from loratune.infer.load import Engine, NameTaken, UnknownModel
from loratune.infer.openai_api import APIError, _Base, now, parse

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


class LoadRequest(_Base):
    name: str = Field(max_length=64)
    path: str = Field(max_length=4096)


def allowed_path(path: str, dirs: Sequence[Path]) -> Path:
    """`path` resolved, if it lies inside one of `dirs` (resolved too); else a 403 naming them."""
    if not dirs:
        raise APIError(403, "loading adapters at run time is off: start `loratune serve` with --adapter-dir DIR "
                            "(the directories adapters may be loaded from)", code="adapter_loading_off")
    resolved = Path(path).expanduser().resolve()
    if not any(resolved.is_relative_to(d) for d in dirs):
        raise APIError(403, f"path: {path!r} is outside the directories adapters may be loaded from "
                            f"({', '.join(map(str, dirs))})", param="path", code="path_not_allowed")
    return resolved


def add_adapter_routes(app: FastAPI, engine: Engine, adapter_dirs: Sequence[str | Path] = (), *,
                       max_body_bytes: int = 1 << 20) -> None:
    """The `/v1/adapters` routes on `app` for `engine` (see the module docstring)."""
    dirs = [Path(d).expanduser().resolve() for d in adapter_dirs]

    def card(name: str) -> dict:
        key = engine.adapters.get(name)
        bank = engine.bank
        return {"id": name, "object": "adapter", "path": str(bank.folders[key]) if bank and key in bank else None,
                "resident": bool(bank and key in bank.resident)}

    @app.get("/v1/adapters")
    async def list_adapters() -> dict:
        names = [n for n, key in list(engine.adapters.items()) if key is not None]
        return {"object": "list", "data": [card(n) for n in names],
                "max_adapters": engine.bank.max_resident if engine.bank else None}

    @app.post("/v1/adapters")
    async def load(request: Request) -> dict:
        req = parse(LoadRequest, await read_json(request, max_body_bytes))
        if not NAME.match(req.name):
            raise APIError(400, f"name: {req.name!r}: expected letters, digits, '.', '_' or '-' (at most 64, "
                                "starting with a letter or digit)", param="name")
        folder = allowed_path(req.path, dirs)
        try:
            await run_in_threadpool(engine.add_adapter, req.name, folder)
        except NameTaken as e:
            raise APIError(409, str(e), param="name", code="name_taken") from None
        except LoratuneError as e:  # no such folder, not a run folder, another base, layers that do not fit
            raise APIError(400, f"path: {e}", param="path", code="incompatible_adapter") from None
        return {**card(req.name), "created": now()}

    @app.delete("/v1/adapters/{name:path}")
    async def unload(name: str) -> dict:
        try:
            await run_in_threadpool(engine.remove_adapter, name)
        except UnknownModel as e:
            raise APIError(404, str(e), param="name", code="model_not_found") from None
        except LoratuneError as e:  # the base
            raise APIError(400, str(e), param="name") from None
        return {"id": name, "object": "adapter", "deleted": True}
