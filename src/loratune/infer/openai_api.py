"""The OpenAI API shapes `loratune serve` speaks: request schemas, limits, errors and response objects.

Requests are validated here, before anything reaches the engine, and every rejection is an `APIError`
that renders as OpenAI's error JSON (`{"error": {"message", "type", "param", "code"}}`), so clients
raise their usual exceptions. (What holds for every value of a body, whatever its field, is checked
before these schemas, in `asgi.check_tree`.) Types are strict: a string or a boolean is not converted
into a number. Unknown fields are ignored (clients send many); fields we cannot honour
(tools, logprobs, presence/frequency penalties) are rejected rather than silently ignored.
Extensions beyond the OpenAI API (as vLLM names them): `top_k`, `repetition_penalty`, `ignore_eos`.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from loratune.infer.sampling import SamplingParams


class APIError(Exception):
    """An error answered in OpenAI's shape with an HTTP status."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


@dataclass(frozen=True)
class Limits:
    """Bounds on what one request may ask for."""

    max_tokens: int  # per answer; also bounded by the context
    default_max_tokens: int = 512  # when the request names none (capped by the room left in the context)
    max_n: int = 8
    max_batch: int = 16  # prompts x n rows in one request
    max_stop: int = 4
    max_stop_chars: int = 200
    max_body_bytes: int = 1 << 20


class _Base(BaseModel):
    # strict: a value of the wrong JSON type is an error, not converted ("10" or true is no max_tokens)
    model_config = ConfigDict(extra="ignore", strict=True)


class StreamOptions(_Base):
    include_usage: bool = False


class _Common(_Base):
    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    n: int | None = Field(None, ge=1)
    stop: str | list[str] | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    seed: int | None = None
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    user: str | None = None
    # extensions
    top_k: int | None = Field(None, ge=0)
    repetition_penalty: float | None = Field(None, gt=0.0, le=10.0)
    ignore_eos: bool = False


class TextPart(_Base):
    type: Literal["text"]
    text: str


class Message(_Base):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = None

    @model_validator(mode="after")
    def _content_present(self) -> "Message":
        if self.content is None and self.role != "assistant":
            raise ValueError(f"a {self.role} message needs content (a string or a list of text parts)")
        return self

    def as_dict(self) -> dict:
        text = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content or [])
        return {"role": "system" if self.role == "developer" else self.role, "content": text}


class ChatRequest(_Common):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = None
    tools: list[Any] | None = None
    functions: list[Any] | None = None
    response_format: dict | None = None


class CompletionRequest(_Common):
    prompt: str | list[str] | list[int] | list[list[int]]
    echo: bool | None = False
    suffix: str | None = None
    logprobs: int | None = None
    best_of: int | None = None


def parse(model: type[_Base], data: Any) -> Any:
    """Validate a decoded JSON body; the first problem becomes a 400 naming the field."""
    if not isinstance(data, dict):
        raise APIError(400, "the request body must be a JSON object")
    try:
        return model.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        param = ".".join(str(p) for p in err["loc"] if not _type_tag(p))
        message = err["msg"].removeprefix("Value error, ")
        raise APIError(400, f"{param or 'body'}: {message}", param=param or None) from None


def _type_tag(part: str | int) -> bool:
    """pydantic's locations name the union member tried (`str`, `list[int]`, `StreamOptions`, `function-after[..]`)
    between field names; fields are snake_case."""
    return isinstance(part, str) and (part in ("str", "int", "float", "bool", "none") or "[" in part
                                      or part[:1].isupper())


def check_unsupported(req: _Common) -> None:
    unsupported = [
        (req.presence_penalty, "presence_penalty", "use repetition_penalty"),
        (req.frequency_penalty, "frequency_penalty", "use repetition_penalty"),
    ]
    if isinstance(req, ChatRequest):
        fmt = (req.response_format or {}).get("type", "text")
        unsupported += [(req.logprobs, "logprobs", ""), (req.tools, "tools", ""), (req.functions, "functions", ""),
                        (fmt != "text", "response_format", "only type 'text' is served")]
    else:
        unsupported += [(req.echo, "echo", ""), (req.suffix, "suffix", ""), (req.logprobs is not None, "logprobs", ""),
                        (req.best_of not in (None, 1, req.n), "best_of", "")]
    for value, name, hint in unsupported:
        if value:
            raise APIError(400, f"{name} is not supported by this server" + (f"; {hint}" if hint else ""), param=name)


def stop_strings(req: _Common, limits: Limits) -> tuple[str, ...]:
    stops = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    if len(stops) > limits.max_stop:
        raise APIError(400, f"stop: at most {limits.max_stop} stop strings, got {len(stops)}", param="stop")
    for s in stops:
        if not s or len(s) > limits.max_stop_chars:
            raise APIError(400, f"stop: each stop string needs 1 to {limits.max_stop_chars} characters", param="stop")
    return tuple(stops)


def sampling_params(req: _Common, requested_max: int | None, longest_prompt: int, context: int,
                    limits: Limits) -> SamplingParams:
    """Sampling settings for a request, checking token budgets against the model's context."""
    if requested_max is not None:
        # The context first: a request over it is told both numbers, whatever the per-request cap.
        if longest_prompt + requested_max > context:
            raise APIError(400, f"This model's maximum context length is {context} tokens. However, you requested "
                                f"{longest_prompt + requested_max} tokens ({longest_prompt} in the prompt, "
                                f"{requested_max} for max_tokens). Reduce the prompt or max_tokens.",
                           param="max_tokens", code="context_length_exceeded")
        if requested_max > limits.max_tokens:
            raise APIError(400, f"max_tokens: at most {limits.max_tokens}, got {requested_max}", param="max_tokens")
        max_new = requested_max
    else:
        if longest_prompt >= context:
            raise APIError(400, f"This model's maximum context length is {context} tokens, and the prompt has "
                                f"{longest_prompt}: no room for an answer.", param="messages",
                           code="context_length_exceeded")
        max_new = min(limits.default_max_tokens, limits.max_tokens, context - longest_prompt)
    temperature = 1.0 if req.temperature is None else req.temperature
    return SamplingParams(max_new_tokens=max_new, temperature=temperature,
                          top_p=1.0 if req.top_p is None else req.top_p, top_k=req.top_k or 0,
                          repetition_penalty=req.repetition_penalty or 1.0, seed=req.seed,
                          stop=stop_strings(req, limits)).validate()


def rows(req: _Common, n_prompts: int, limits: Limits) -> int:
    n = req.n or 1
    if n > limits.max_n:
        raise APIError(400, f"n: at most {limits.max_n}, got {n}", param="n")
    if n * n_prompts > limits.max_batch:
        raise APIError(400, f"at most {limits.max_batch} answers per request (prompts x n), got {n * n_prompts}",
                       param="n")
    return n


# ------------------------------------------------------------------------------------------- responses


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def now() -> int:
    return int(time.time())


def usage(prompt: int, completion: int) -> dict:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def model_card(name: str, created: int) -> dict:
    return {"id": name, "object": "model", "created": created, "owned_by": "loratune"}
