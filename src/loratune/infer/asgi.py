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
import math
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
                await ErrorResponse(err.body(), status_code=401)(scope, receive, send)
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


MAX_DEPTH = 64  # objects and arrays inside each other; an OpenAI request (tool schemas included) needs far fewer
INT64 = (-(1 << 63), (1 << 63) - 1)


class ErrorResponse(JSONResponse):
    """An error body that always encodes: non-ASCII characters escaped, so no echoed input can break it."""

    def render(self, content: object) -> bytes:
        return json.dumps(content, ensure_ascii=True, separators=(",", ":")).encode("ascii")


async def read_json(request: Request, limit: int) -> object:
    """The request's JSON body, or an `APIError`: 415 unless it is declared `application/json` (a web page can
    post `text/plain` to a local server without a CORS preflight), 413 over `limit` bytes, 400 when it is not
    JSON or breaks one of the rules of `check_tree`."""
    media = request.headers.get("content-type", "").partition(";")[0].strip().lower()
    if media != "application/json":
        raise APIError(415, "the request body must be sent with 'Content-Type: application/json', got "
                            + (repr(media) if media else "none"), code="unsupported_media_type")
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise APIError(413, f"the request body is {declared} bytes; the limit is {limit}")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise APIError(413, f"the request body exceeds the limit of {limit} bytes")
    try:
        data = json.loads(body, parse_constant=_no_constant)
    except RecursionError:
        raise APIError(400, f"the request body is nested deeper than {MAX_DEPTH} levels") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise APIError(400, f"the request body is not valid JSON: {e}") from None
    check_tree(data)
    return data


def _no_constant(name: str) -> float:
    raise ValueError(f"{name} is not a JSON number")


def check_tree(root: object) -> None:
    """Rules for every value of a decoded body, whatever field it sits in, checked before any field is read:
    - text is valid Unicode: JSON's `\\ud800` escape decodes to a lone surrogate, which no tokenizer,
      template or response can encode;
    - integers fit in 64 bits (seeds, token ids, counts: torch and the tokenizer take nothing larger);
    - numbers are finite (`1e400` decodes to inf);
    - objects and arrays nest at most MAX_DEPTH deep (validation, templates and our own code recurse).
    The first value that breaks one is a 400 whose `param` is its path (`messages.0.content`).
    """
    stack: list[tuple[object, tuple, int]] = [(root, (), 0)]
    while stack:
        value, path, depth = stack.pop()
        if isinstance(value, (dict, list)):
            if depth >= MAX_DEPTH:  # named by its top-level field: the full path would be MAX_DEPTH long
                raise _bad(path[:1], f"nested deeper than {MAX_DEPTH} levels")
            items = list(value.items() if isinstance(value, dict) else enumerate(value))
            for key, _ in items:
                if isinstance(key, str) and not _encodable(key):
                    shown = key.encode("utf-8", "backslashreplace").decode("utf-8")
                    raise _bad(path, f"the key '{shown}' is not valid Unicode (it holds a lone surrogate)")
            stack.extend((item, (*path, key), depth + 1) for key, item in reversed(items))
        elif isinstance(value, str):
            if not _encodable(value):
                raise _bad(path, "the text is not valid Unicode: it holds a lone surrogate (e.g. the JSON escape "
                                 "\\ud800 without its pair)")
        elif isinstance(value, bool) or value is None:
            continue
        elif isinstance(value, int) and not INT64[0] <= value <= INT64[1]:
            raise _bad(path, f"the integer {value} does not fit in 64 bits")
        elif isinstance(value, float) and not math.isfinite(value):
            raise _bad(path, f"the number {value} is not finite")


def _encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _bad(path: tuple, problem: str) -> APIError:
    param = ".".join(str(p) for p in path) or None
    return APIError(400, f"{param or 'body'}: {problem}", param=param)
