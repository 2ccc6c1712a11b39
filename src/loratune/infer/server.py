"""`loratune serve`: the engine behind an OpenAI-compatible HTTP API (FastAPI + uvicorn).

One worker thread owns the model. By default it runs one generation at a time (a batch is the n answers
of one request). With `batch_slots` > 1 on loratune's decoder it batches continuously
(`infer/batcher.py`): requests join the running batch at step boundaries and leave when they finish, in
arrival order, rows of different adapters (and the base) in one batch (`decoder/multi_lora.py`), each
request in slots of `slot_tokens` tokens (a larger request is a 400). Adapters are loaded and unloaded at
run time through `/v1/adapters` (`infer/adapter_api.py`), from the `adapter_dirs` only. Requests are admitted
up to `max_pending` (running plus waiting); beyond it the answer is 429 at once, so a flood cannot pile up
unbounded work. Each admitted request becomes a `Job` with a cancel flag the engine checks between tokens: a client that
disconnects (stream closed, or a non-streaming request abandoned) sets it, and its slot frees within a
step. Events cross from the worker thread to the event loop through `call_soon_threadsafe`.

Every route, /health included, sits behind the API key when one is set; the server binds 127.0.0.1
unless told otherwise. Every request leaves one access-log line through Python logging (`infer/asgi.py`),
and model loading shows no progress bars.

Tools: a chat request's `tools` go to the chat template; when it has them (and tool_choice is not "none"),
each answer passes through a `ToolCallStream` in the convention the model's template writes calls in
(`infer/tools.py`), so calls come back as OpenAI `tool_calls` with finish_reason "tool_calls", streamed or
not. A template whose convention is not recognised answers text, and the log says so once per model.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import logging
import os
import queue
import socket
import threading
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from loratune.errors import LoratuneError
from loratune.infer.extras import missing_extra

try:
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, StreamingResponse
    from starlette.exceptions import HTTPException as StarletteHTTPException
except ModuleNotFoundError as e:  # `pip install loratune` without the [serve] extra
    raise missing_extra("serve", e) from None

from loratune.infer.adapter_api import add_adapter_routes
from loratune.infer.asgi import AccessLog, ApiKeyMiddleware, ErrorResponse, read_json
from loratune.infer.batcher import Batcher, Submission
from loratune.infer.engine import Delta, Finish
from loratune.infer.load import Engine, ToolsNotRendered, UnknownModel
from loratune.infer.openai_api import (APIError, ChatRequest, CompletionRequest, Limits, check_unsupported,
                                       model_card, new_id, now, parse, rows, sampling_params, usage)
from loratune.infer.reward_api import add_reward_routes, load_reward_models
from loratune.infer.sampling import SamplingParams
from loratune.infer.tools import CallSyntax, ToolCallStream

log = logging.getLogger(__name__)

API_KEY_ENV = "LORATUNE_API_KEY"
_END = object()


@dataclass
class Job:
    """One request's generation: its prompts (token ids), settings, model, and the channel back."""

    prompts: list[list[int]]
    params: SamplingParams
    model: str
    ignore_eos: bool
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)
    state: str = "queued"  # queued -> running -> done (or queued -> done when cancelled while waiting)

    ended_cancelled: bool = False  # an answer of it ended "cancelled" (continuous batching's accounting)

    def put(self, item: object) -> None:
        self.loop.call_soon_threadsafe(self.events.put_nowait, item)

    def emit(self, event: Delta | Finish) -> None:
        """An event of its answers, from the worker thread."""
        if isinstance(event, Finish) and event.reason == "cancelled":
            self.ended_cancelled = True
        self.put(event)

    async def stream(self) -> AsyncIterator[Delta | Finish]:
        while (item := await self.events.get()) is not _END:
            if isinstance(item, BaseException):
                raise item
            yield item


class Worker:
    """The thread that runs jobs in arrival order; admission is bounded by `max_pending`.

    A slot is held from admission until the job is done. A job cancelled while it waits gives its slot
    back at once (the worker skips it later); a running one stops at the next token and then gives it back.
    """

    def __init__(self, engine: Engine, max_pending: int, batch_slots: int = 1, slot_tokens: int | None = None) -> None:
        self.engine, self.max_pending = engine, max_pending
        # continuous batching (loratune's decoder, more than one slot): requests decode together
        self.batcher = Batcher(engine, batch_slots, slot_tokens) if batch_slots > 1 and engine.decoder else None
        if batch_slots > 1 and not engine.decoder:
            log.warning("continuous batching runs on loratune's decoder; %s: one request at a time", engine.why)
        self._jobs: queue.Queue[Job | None] = queue.Queue()
        self._lock = threading.Lock()
        self.pending = self.running = self.completed = self.cancelled = 0
        self._closing = threading.Event()  # shutting down: stop the running job, skip the queued ones
        self._thread = threading.Thread(target=self._run, name="loratune-generate", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._closing.set()
        self._jobs.put(None)
        self._thread.join(timeout=30)

    def submit(self, job: Job) -> None:
        if self.batcher is not None:
            room, rows = self.batcher.capacity, self.batcher.slots
            if max(map(len, job.prompts)) + job.params.max_new_tokens > room:
                raise APIError(400, f"prompt + max_tokens exceed the {room} tokens of a batch slot "
                                    "(loratune serve --slot-tokens); ask for fewer tokens", param="max_tokens")
            if len(job.prompts) > rows:
                raise APIError(400, f"{len(job.prompts)} answers asked; a batch holds {rows} (loratune serve "
                                    "--batch-slots)", param="n")
        with self._lock:
            if self.pending >= self.max_pending:
                raise APIError(429, f"the server is busy: {self.pending} requests are running or queued "
                                    f"(limit {self.max_pending}); retry shortly",
                               type="rate_limit_error", code="rate_limit_exceeded")
            self.pending += 1
        self._jobs.put(job)

    def cancel(self, job: Job) -> None:
        """The client went away: stop the job (running) or drop it and free its slot now (queued)."""
        with self._lock:
            job.cancelled.set()
            if job.state == "queued":
                self._release(job, "cancelled")
                job.put(_END)

    def _release(self, job: Job, outcome: str) -> None:  # caller holds the lock
        job.state = "done"
        self.pending -= 1
        if outcome == "cancelled":
            self.cancelled += 1
        else:
            self.completed += 1

    def _run(self) -> None:
        if self.batcher is not None:
            self._run_batched(self.batcher)
            return
        while (job := self._jobs.get()) is not None:
            with self._lock:
                if job.state != "queued":  # cancelled while it waited: its slot is already free
                    continue
                job.state, self.running = "running", self.running + 1

            def cancel(job: Job = job) -> bool:
                return job.cancelled.is_set() or self._closing.is_set()

            outcome = "cancelled"
            try:
                if not cancel():
                    outcome = "completed"
                    for event in self.engine.generate(job.prompts, job.params, job.model, cancel,
                                                      ignore_eos=job.ignore_eos):
                        if isinstance(event, Finish) and event.reason == "cancelled":
                            outcome = "cancelled"
                        job.put(event)
            except UnknownModel as e:  # its adapter was unloaded while it waited
                job.put(APIError(404, str(e), param="model", code="model_not_found"))
            except Exception as e:  # a bug or an out-of-memory: the request fails, the server stays up
                log.exception("generation failed")
                job.put(APIError(500, f"generation failed: {type(e).__name__}: {e}", type="server_error"))
            finally:
                job.put(_END)
                with self._lock:
                    self.running -= 1
                    self._release(job, outcome)


    def _run_batched(self, batcher: Batcher) -> None:
        """Continuous batching: jobs join the running batch at step boundaries, in arrival order (one that
        does not fit yet, e.g. another adapter's, holds the ones behind it), and leave when they finish."""
        waiting: deque[Job] = deque()
        closing = False
        while True:
            if not closing:
                try:  # wait for work only when there is none; take everything that arrived before stepping
                    job = self._jobs.get(block=batcher.empty and not waiting)
                    if job is None:
                        closing = True  # the running jobs see the closing flag as a cancel at the next step
                    else:
                        waiting.append(job)
                    continue
                except queue.Empty:
                    pass
            while waiting and (closing or waiting[0].state != "queued" or batcher.fits(self._submission(waiting[0]))):
                job = waiting.popleft()
                with self._lock:
                    if job.state != "queued":  # cancelled while it waited: its slot is already free
                        continue
                    if closing:
                        self._release(job, "cancelled")
                        job.put(_END)
                        continue
                    job.state, self.running = "running", self.running + 1
                try:
                    batcher.admit(self._submission(job))
                except LoratuneError as e:  # its model was unloaded while it waited, or its adapter cannot be read
                    gone = isinstance(e, UnknownModel)
                    job.put(APIError(404, str(e), param="model", code="model_not_found") if gone
                            else APIError(500, str(e), type="server_error"))
                    job.put(_END)
                    with self._lock:
                        self.running -= 1
                        self._release(job, "completed")
            if batcher.empty:
                if closing:
                    return
                continue
            try:
                done = batcher.step()
            except Exception as e:  # a bug or an out-of-memory: the running requests fail, the server stays up
                log.exception("generation failed")
                done = batcher.fail()
                for sub in done:
                    sub.tag.put(APIError(500, f"generation failed: {type(e).__name__}: {e}", type="server_error"))
            for sub in done:
                job = sub.tag
                job.put(_END)
                with self._lock:
                    self.running -= 1
                    self._release(job, "cancelled" if job.ended_cancelled else "completed")

    def _submission(self, job: Job) -> Submission:
        def cancel() -> bool:
            return job.cancelled.is_set() or self._closing.is_set()

        return Submission(job.prompts, job.params, job.model, job.emit, cancel, job.ignore_eos, tag=job)


# ------------------------------------------------------------------------------------------------ app


def _sse(obj: dict) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def create_app(engine: Engine, *, api_key: str | None = None, max_pending: int = 8,
               limits: Limits | None = None, batch_slots: int = 1, slot_tokens: int | None = None,
               rewards: dict | None = None, adapter_dirs: list[str] | tuple[str, ...] = ()) -> FastAPI:
    """The FastAPI application serving `engine`'s models. `batch_slots` > 1 (on loratune's decoder): requests
    decode together in that many KV-cache rows of `slot_tokens` tokens each (default: the context length).
    `rewards`: reward models (name -> `loratune.pref.scoring.RewardScorer`) answering /v1/rewards.
    `adapter_dirs`: directories adapters may be loaded from at run time (`/v1/adapters`; none: loading off)."""
    limits = limits or Limits(max_tokens=engine.context_length)
    worker = Worker(engine, max_pending, batch_slots, slot_tokens)
    created = now()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        worker.start()
        yield
        worker.stop()

    app = FastAPI(title="loratune", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.worker = worker
    if api_key:
        app.add_middleware(ApiKeyMiddleware, key=api_key)
    app.add_middleware(AccessLog)  # added last, so outermost: rejected requests are logged too

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> ErrorResponse:
        return ErrorResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> ErrorResponse:
        code = "not_found" if exc.status_code == 404 else None
        return ErrorResponse(APIError(exc.status_code, str(exc.detail), code=code).body(), status_code=exc.status_code)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> ErrorResponse:
        return ErrorResponse(APIError(400, str(exc.errors()[0].get("msg"))).body(), status_code=400)

    @app.exception_handler(Exception)
    async def _server_fault(request: Request, exc: Exception) -> ErrorResponse:
        """A bug: the client still gets OpenAI's error JSON (a 500), the log gets the traceback."""
        log.error("%s %s failed", request.method, request.url.path, exc_info=exc)
        err = APIError(500, f"internal server error: {type(exc).__name__}", type="server_error")
        return ErrorResponse(err.body(), status_code=500)

    def resolve_model(name: str) -> str:
        if name not in engine.adapters:
            raise APIError(404, f"The model '{name}' does not exist; served models: {', '.join(engine.names)}",
                           param="model", code="model_not_found")
        return name

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", "models": engine.names, "pending": worker.pending, "running": worker.running,
                "max_pending": max_pending,
                "completed": worker.completed, "cancelled": worker.cancelled}

    @app.get("/v1/models")
    async def list_models() -> dict:
        return {"object": "list", "data": [model_card(n, created) for n in engine.names]}

    @app.get("/v1/models/{name:path}")
    async def get_model(name: str) -> dict:
        return model_card(resolve_model(name), created)

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        req = parse(ChatRequest, await read_json(request, limits.max_body_bytes))
        check_unsupported(req)
        name = resolve_model(req.model)
        fmt = engine.format(name)
        messages = req.conversation()
        try:
            prompt = fmt.render(messages, req.tool_schemas())
        except ToolsNotRendered as e:
            raise APIError(400, f"{e.what}: {e}", param=e.what) from None
        except Exception as e:  # the chat template itself rejects the conversation (e.g. role order)
            raise APIError(400, f"messages: the chat template cannot render them: {e}", param="messages") from None
        params = sampling_params(req, req.max_completion_tokens or req.max_tokens, len(prompt),
                                 engine.context_length, limits)
        params = params.with_updates(stop=tuple(dict.fromkeys(params.stop + fmt.stop_strings)))
        n = rows(req, 1, limits)
        syntax = tool_syntax(name) if req.wants_tool_calls else None
        return await _respond(request, req, name, [prompt] * n, [len(prompt)], params, chat=True, syntax=syntax)

    unrecognised: set[str] = set()

    def tool_syntax(name: str) -> CallSyntax | None:
        """The model's tool-call convention; one log line per model when there is none we can parse."""
        syntax = engine.format(name).tool_syntax
        if syntax is None and name not in unrecognised:
            unrecognised.add(name)
            log.warning("model %r: its chat template writes tool calls in no form loratune recognises; "
                        "answers to requests with tools come back as text content", name)
        return syntax

    @app.post("/v1/completions")
    async def completions(request: Request):
        req = parse(CompletionRequest, await read_json(request, limits.max_body_bytes))
        check_unsupported(req)
        name = resolve_model(req.model)
        fmt = engine.format(name)
        p = req.prompt
        if isinstance(p, str):
            prompts = [fmt.encode(p)]
        elif p and all(isinstance(x, int) for x in p):
            prompts = [list(p)]
        else:
            prompts = [fmt.encode(x) if isinstance(x, str) else list(x) for x in p]
        if not prompts or any(not x for x in prompts):
            raise APIError(400, "prompt: every prompt needs at least one token", param="prompt")
        vocab = engine.vocab_size
        if any(not 0 <= t < vocab for x in prompts for t in x):
            raise APIError(400, f"prompt: token ids must be in [0, {vocab})", param="prompt")
        params = sampling_params(req, req.max_tokens, max(map(len, prompts)), engine.context_length, limits)
        n = rows(req, len(prompts), limits)
        batch = [x for x in prompts for _ in range(n)]
        return await _respond(request, req, name, batch, [len(x) for x in prompts], params, chat=False)

    async def _watch(request: Request, job: Job) -> None:
        """A client that goes away (before or during its answer) cancels its job and frees its slot."""
        while not await request.is_disconnected():
            await asyncio.sleep(0.05)
        worker.cancel(job)

    async def _respond(request: Request, req, name: str, batch: list[list[int]], prompt_lens: list[int],
                       params: SamplingParams, chat: bool, syntax: CallSyntax | None = None):
        job = Job(batch, params, name, req.ignore_eos, asyncio.get_running_loop())
        worker.submit(job)
        ident = new_id("chatcmpl" if chat else "cmpl")
        answers = Answers(len(batch), syntax)
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            # The watcher also covers a client that leaves before the stream starts (e.g. while queued).
            watcher = asyncio.create_task(_watch(request, job))
            return StreamingResponse(_stream(job, watcher, ident, name, chat, sum(prompt_lens), include_usage, answers),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        return JSONResponse(await _collect(request, job, ident, name, chat, sum(prompt_lens), answers))

    async def _collect(request: Request, job: Job, ident: str, name: str, chat: bool, prompt_tokens: int,
                       answers: Answers) -> dict:
        watcher = asyncio.create_task(_watch(request, job))
        texts, calls, finishes = [""] * len(job.prompts), [[] for _ in job.prompts], {}
        try:
            async for ev in job.stream():
                if isinstance(ev, Delta):
                    texts[ev.row] += answers.feed(ev.row, ev.text)
                else:
                    tail, calls[ev.row] = answers.finish(ev.row)
                    texts[ev.row] += tail
                    finishes[ev.row] = ev
        finally:
            watcher.cancel()
        if len(finishes) < len(job.prompts):  # cancelled while queued: the client has gone, nobody reads this
            raise APIError(499, "the request was cancelled: the client closed the connection")
        completion = sum(f.completion_tokens for f in finishes.values())
        if chat:
            choices = [{"index": i, "message": _message(t, calls[i]), "logprobs": None,
                        "finish_reason": "tool_calls" if calls[i] else finishes[i].reason} for i, t in enumerate(texts)]
        else:
            choices = [{"index": i, "text": t, "logprobs": None, "finish_reason": finishes[i].reason}
                       for i, t in enumerate(texts)]
        return {"id": ident, "object": "chat.completion" if chat else "text_completion", "created": now(),
                "model": name, "choices": choices, "usage": usage(prompt_tokens, completion)}

    async def _stream(job: Job, watcher: asyncio.Task, ident: str, name: str, chat: bool, prompt_tokens: int,
                      include_usage: bool, answers: Answers) -> AsyncIterator[str]:
        created, obj = now(), "chat.completion.chunk" if chat else "text_completion"

        def chunk(choices: list[dict], **extra) -> str:
            return _sse({"id": ident, "object": obj, "created": created, "model": name, "choices": choices, **extra})

        def choice(i: int, text: str | None, finish: str | None, first: bool = False) -> dict:
            if chat:
                delta = ({"role": "assistant", "content": ""} if first else
                         {"content": text} if text is not None else {})
                return {"index": i, "delta": delta, "logprobs": None, "finish_reason": finish}
            return {"index": i, "text": text or "", "logprobs": None, "finish_reason": finish}

        completion, done = 0, False
        try:
            if chat:
                yield chunk([choice(i, None, None, first=True) for i in range(len(job.prompts))])
            async for ev in job.stream():
                if isinstance(ev, Delta):
                    if text := answers.feed(ev.row, ev.text):
                        yield chunk([choice(ev.row, text, None)])
                else:
                    completion += ev.completion_tokens
                    tail, calls = answers.finish(ev.row)
                    if tail:
                        yield chunk([choice(ev.row, tail, None)])
                    if calls:  # each call whole, in one chunk (clients accumulate deltas by index either way)
                        delta = {"tool_calls": [{"index": k, **c} for k, c in enumerate(calls)]}
                        yield chunk([{"index": ev.row, "delta": delta, "logprobs": None, "finish_reason": None}])
                    yield chunk([choice(ev.row, None, "tool_calls" if calls else ev.reason)])
            if include_usage:
                yield chunk([], usage=usage(prompt_tokens, completion))
            yield "data: [DONE]\n\n"
            done = True
        except APIError as e:
            done = True
            yield _sse(e.body())
        finally:  # also runs when the client disconnects and the response task is cancelled
            watcher.cancel()
            if not done:
                worker.cancel(job)

    add_reward_routes(app, rewards or {}, max_body_bytes=limits.max_body_bytes)  # infer/reward_api.py
    add_adapter_routes(app, engine, adapter_dirs, max_body_bytes=limits.max_body_bytes)  # infer/adapter_api.py
    return app


class Answers:
    """Each row's generated text on its way to the client: unchanged, or through a `ToolCallStream` when the
    request has tools and the template's call syntax is known (calls held back, then parsed)."""

    def __init__(self, rows: int, syntax: CallSyntax | None) -> None:
        self.streams = [ToolCallStream(syntax) if syntax else None for _ in range(rows)]

    def feed(self, row: int, text: str) -> str:
        stream = self.streams[row]
        return stream.feed(text) if stream else text

    def finish(self, row: int) -> tuple[str, list[dict]]:
        stream = self.streams[row]
        return stream.finish() if stream else ("", [])


def _message(content: str, calls: list[dict]) -> dict:
    """An assistant message: content null when it is only tool calls, as OpenAI answers."""
    if not calls:
        return {"role": "assistant", "content": content}
    return {"role": "assistant", "content": content or None, "tool_calls": calls}


def _check_bindable(host: str, port: int) -> None:
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise LoratuneError(f"--host {host!r} is not an address of this machine: {e.strerror}") from None
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does
        try:
            s.bind(address)
        except OSError as e:
            raise LoratuneError(f"cannot listen on {host}:{port}: {e.strerror}"
                                + ("; pick another --port" if e.errno == errno.EADDRINUSE else "")) from None


def serve(sources: list[str], *, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
          bits: int | None = None, max_pending: int = 8, limits: dict | None = None, batch_slots: int = 1,
          slot_tokens: int | None = None, rewards: list[str] | tuple[str, ...] = (), max_adapters: int | None = None,
          adapter_dirs: list[str] | tuple[str, ...] = ()) -> None:
    """Load the models and run the server until interrupted (`batch_slots`, `slot_tokens`, `adapter_dirs`:
    `create_app`; `rewards`: reward-model runs as `[NAME=]FOLDER`, `loratune.infer.reward_api`; `max_adapters`:
    adapters on the device at once, an LRU, None: no limit)."""
    try:
        import uvicorn
    except ModuleNotFoundError as e:
        raise missing_extra("serve", e) from None

    from loratune.infer.load import load_engine, quiet_library_noise, quiet_loading

    if batch_slots < 1 or (slot_tokens is not None and slot_tokens < 1):
        raise LoratuneError(f"--batch-slots must be >= 1 and --slot-tokens >= 1 (0: the context), got {batch_slots} "
                            f"and {slot_tokens}")
    if max_adapters is not None and max_adapters < 1:
        raise LoratuneError(f"--max-adapters must be >= 1 (0: no limit), got {max_adapters}")
    missing = [d for d in adapter_dirs if not os.path.isdir(d)]
    if missing:
        raise LoratuneError(f"--adapter-dir {missing[0]!r} is not a directory")
    quiet_library_noise()
    api_key = api_key or os.environ.get(API_KEY_ENV) or None
    _check_bindable(host, port)  # before minutes of model loading, not after
    with quiet_loading():
        engine = load_engine(sources, bits=bits, implementation=None, max_adapters=max_adapters)
        scorers = load_reward_models(rewards)
    app = create_app(engine, api_key=api_key, max_pending=max_pending,
                     limits=Limits(**{"max_tokens": engine.context_length, **(limits or {})}),
                     batch_slots=batch_slots, slot_tokens=slot_tokens, rewards=scorers, adapter_dirs=adapter_dirs)
    if not api_key and host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("serving on %s without an API key: anyone who can reach it can use it", host)
    print(f"loratune serve: models {', '.join(engine.names)}"
          + (f", reward models {', '.join(scorers)}" if scorers else "") + f" on http://{host}:{port}/v1"
          + (" (API key required)" if api_key else "") + f"; {engine.why}", flush=True)
    # log_config=None: uvicorn's own records (warnings and up) go through the CLI's logging like ours
    uvicorn.run(app, host=host, port=port, log_level="warning", access_log=False, log_config=None)
