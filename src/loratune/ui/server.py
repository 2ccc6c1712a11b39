"""`loratune ui`: the page served by uvicorn, on 127.0.0.1 unless told otherwise, with a token elsewhere.

Bound to a loopback address the page needs no password (only this machine reaches it, as with `serve`);
bound to any other address it refuses to start without a token, which the login form then asks for (any
user name, the token as password, compared in constant time). Request bodies are capped (`BodyLimit`):
uploads at `MAX_UPLOAD_BYTES`, every other request at `MAX_BODY_BYTES`, whether or not the client states a
Content-Length. Gradio's file route is told that the workspace is blocked: the page never serves a
workspace file by its path (downloads are copies in the temporary folder).
"""

from __future__ import annotations

import hmac
import ipaddress
import os
from typing import Any

from loratune.ui.paths import (
    MAX_BODY_BYTES,
    MAX_UPLOAD_BYTES,
    Workspace,
    WorkspaceError,
)

TOKEN_VARIABLE = "LORATUNE_UI_TOKEN"
UPLOAD_ROUTE = "/gradio_api/upload"


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class BodyLimit:
    """ASGI middleware: answer 413 to a request whose body is larger than its route allows."""

    def __init__(self, app: Any, upload_limit: int = MAX_UPLOAD_BYTES + (1 << 20), limit: int = MAX_BODY_BYTES):
        self.app, self.upload_limit, self.limit = app, upload_limit, limit

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        limit = self.upload_limit if scope["path"].startswith(UPLOAD_ROUTE) else self.limit
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > limit):
            return await _too_large(send, limit)
        seen, answered = 0, False

        async def counted() -> dict:
            # past the limit: answer 413 now and tell the app the client left (an exception raised here would
            # be caught by the framework's body parsing and turned into a 400)
            nonlocal seen, answered
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit and not answered:
                    answered = True
                    await _too_large(send, limit)
                    return {"type": "http.disconnect"}
            return message

        async def guarded(message: dict) -> None:
            if not answered:
                await send(message)

        await self.app(scope, counted, guarded)


async def _too_large(send: Any, limit: int) -> None:
    body = f"request body larger than {limit:,} bytes".encode()
    await send({"type": "http.response.start", "status": 413,
                "headers": [(b"content-type", b"text/plain; charset=utf-8"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


def make_app(workspace: str | os.PathLike, token: str | None = None, lang: str = "en") -> Any:
    """The FastAPI app serving the UI of `workspace` (token: require it at the login form)."""
    import gradio as gr
    from fastapi import FastAPI

    from loratune.ui.app import CSS, build_app

    ws = Workspace.at(workspace)
    app = FastAPI(docs_url=None, redoc_url=None, openapi_url=None)
    auth = None
    if token:
        expected = token.encode()

        def auth(username: str, password: str) -> bool:
            return hmac.compare_digest((password or "").encode(), expected)

    app = gr.mount_gradio_app(app, build_app(ws, lang), path="", auth=auth,
                              auth_message="loratune ui: any user name, the token as password",
                              max_file_size=MAX_UPLOAD_BYTES, blocked_paths=[str(ws.root)], allowed_paths=[],
                              ssr_mode=False, footer_links=[], css=CSS, show_error=False)
    app.add_middleware(BodyLimit)
    return app


def serve_ui(host: str = "127.0.0.1", port: int = 7860, workspace: str = ".", token: str | None = None,
             lang: str = "en") -> None:
    import uvicorn

    token = token or os.environ.get(TOKEN_VARIABLE) or None
    if not is_loopback(host) and not token:
        raise WorkspaceError(f"--host {host} is reachable from other machines: set --token (or {TOKEN_VARIABLE}) "
                             "so that the page asks for it")
    app = make_app(workspace, token, lang)
    print(f"loratune ui: http://{host}:{port}/  (workspace {Workspace.at(workspace).root})", flush=True)
    uvicorn.run(app, host=host, port=port, log_level="warning")
