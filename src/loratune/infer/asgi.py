"""The server's HTTP edge, below the routes: API key, access log, and reading a request body.

Plain ASGI middlewares rather than FastAPI dependencies, so that they cover every route, unknown paths
and errors alike: a request without the key never reaches routing, and every request, answered by a route,
by an error handler or by a crash, leaves exactly one access-log line.

The access log goes through Python logging (logger `loratune.serve.access`, INFO), one line per request:
method, path, status, duration (to the last byte sent, so a streamed answer counts whole) and client
address; the same values ride on the record as `http_method`, `http_path`, `http_status`, `duration_ms` and
`client` for a handler that wants fields. uvicorn's own access log is off.
"""

from __future__ import annotations

import hmac
import json
import logging
import time
from collections.abc import Callable

from starlette.requests import Request
from starlette.responses import JSONResponse

from loratune.infer.openai_api import APIError

access_log = logging.getLogger("loratune.serve.access")


class ApiKeyMiddleware:
    """Rejects every HTTP request without `Authorization: Bearer KEY`."""

    def __init__(self, app: Callable, key: str) -> None:
        self.app, self.expected = app, f"Bearer {key}".encode()

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http":
            given = dict(scope["headers"]).get(b"authorization", b"")
            if not hmac.compare_digest(given, self.expected):
                err = APIError(401, "invalid or missing API key: send 'Authorization: Bearer KEY'",
                               code="invalid_api_key")
                await JSONResponse(err.body(), status_code=401)(scope, receive, send)
                return
        await self.app(scope, receive, send)


class AccessLog:
    """One log line per HTTP request, written when the response is complete (or the request failed)."""

    def __init__(self, app: Callable) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status: int | None = None

        async def watch(message: dict) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, watch)
        finally:  # an exception with nothing sent becomes the 500 the outermost error handler answers
            _log_request(scope, status or 500, time.perf_counter() - started)


def _log_request(scope: dict, status: int, seconds: float) -> None:
    host, port = scope.get("client") or ("-", 0)
    client = f"{host}:{port}" if port else host
    fields = {"http_method": scope["method"], "http_path": scope["path"], "http_status": status,
              "duration_ms": round(seconds * 1000, 1), "client": client}
    access_log.info("%s %s %d %.1f ms %s", fields["http_method"], fields["http_path"].encode("unicode_escape")
                    .decode("ascii"), status, fields["duration_ms"], client, extra=fields)


async def read_json(request: Request, limit: int) -> object:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise APIError(413, f"the request body is {declared} bytes; the limit is {limit}")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise APIError(413, f"the request body exceeds the limit of {limit} bytes")
    try:
        return json.loads(body)
    except (ValueError, UnicodeDecodeError) as e:
        raise APIError(400, f"the request body is not valid JSON: {e}") from None
