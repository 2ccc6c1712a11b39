"""The OpenAI API shapes `loratune serve` speaks: request schemas, limits, errors and response objects.

Requests are validated here, before anything reaches the engine, and every rejection is an `APIError`
that renders as OpenAI's error JSON (`{"error": {"message", "type", "param", "code"}}`), so clients
raise their usual exceptions. (What holds for every value of a body, whatever its field, is checked
before these schemas, in `asgi.check_tree`.) Types are strict: a string or a boolean is not converted
into a number. Unknown fields are ignored (clients send many); fields we cannot honour
(logprobs, presence/frequency penalties, a forced tool_choice) are rejected rather than silently ignored.
Tools are served: schemas go to the chat template, and assistant `tool_calls` (arguments as JSON text,
as OpenAI sends them) and `tool` messages become the message shape training records have.
Extensions beyond the OpenAI API (as vLLM names them): `top_k`, `repetition_penalty`, `ignore_eos`.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

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


class FunctionCall(_Base):
    name: str = Field(min_length=1)
    arguments: str  # a JSON object, as text (OpenAI's shape)

    @field_validator("arguments")
    @classmethod
    def _json_object(cls, value: str) -> str:
        try:
            parsed = json.loads(value)
        except ValueError:
            parsed = None
        if not isinstance(parsed, dict):
            raise ValueError("must be a JSON object written as a string, e.g. '{\"city\": \"Paris\"}'")
        return value


class ToolCall(_Base):
    id: str = Field(min_length=1)
    type: Literal["function"] = "function"
    function: FunctionCall

    def as_dict(self) -> dict:
        """The shape data.formats gives training records: arguments as an object."""
        return {"id": self.id, "type": "function",
                "function": {"name": self.function.name, "arguments": json.loads(self.function.arguments)}}


class Message(_Base):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = Field(None, min_length=1)
    tool_call_id: str | None = Field(None, min_length=1)

    @model_validator(mode="after")
    def _shape(self) -> Message:
        if self.content is None and not (self.role == "assistant" and self.tool_calls):
            raise ValueError(f"a {self.role} message needs content (a string or a list of text parts)"
                             + (" or tool_calls" if self.role == "assistant" else ""))
        if self.tool_calls and self.role != "assistant":
            raise ValueError(f"tool_calls belong to assistant messages, not to a {self.role} message")
        if self.role == "tool" and self.tool_call_id is None:
            raise ValueError("a tool message needs the tool_call_id of the call it answers")
        return self

    def as_dict(self) -> dict:
        text = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content or [])
        out = {"role": "system" if self.role == "developer" else self.role, "content": text}
        if self.tool_calls:
            out["tool_calls"] = [c.as_dict() for c in self.tool_calls]
        if self.tool_call_id is not None:
            out["tool_call_id"] = self.tool_call_id
        if self.name is not None:
            out["name"] = self.name
        return out


class FunctionDef(_Base):
    name: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")  # OpenAI's rule for function names
    description: str | None = None
    parameters: dict | None = None  # a JSON schema, passed to the chat template as given
    strict: bool | None = None


class Tool(_Base):
    type: Literal["function"]
    function: FunctionDef


class ChatRequest(_Common):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = None
    tools: list[Tool] | None = Field(None, max_length=128)
    tool_choice: Literal["none", "auto", "required"] | dict | None = None
    parallel_tool_calls: bool | None = None
    functions: list[Any] | None = None
    response_format: dict | None = None

    @property
    def wants_tool_calls(self) -> bool:
        """Parse tool calls out of the answers: tools were given and tool_choice is not "none"."""
        return bool(self.tools) and self.tool_choice != "none"

    def tool_schemas(self) -> list[dict] | None:
        return [t.model_dump(exclude_none=True) for t in self.tools] if self.tools else None

    def conversation(self) -> list[dict]:
        """The messages as the chat template takes them; a tool message gets the name of the call it answers,
        and must answer a call made before it."""
        names: dict[str, str] = {}
        out = []
        for i, m in enumerate(self.messages):
            d = m.as_dict()
            for call in m.tool_calls or []:
                names[call.id] = call.function.name
            if m.role == "tool":
                if m.tool_call_id not in names:
                    raise APIError(400, f"messages.{i}.tool_call_id: {m.tool_call_id!r} answers no tool call of an "
                                        "earlier assistant message", param=f"messages.{i}.tool_call_id")
                d.setdefault("name", names[m.tool_call_id])
            out.append(d)
        return out


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
        forced = req.tool_choice not in (None, "auto", "none")
        unsupported += [(req.logprobs, "logprobs", ""), (req.functions, "functions", "use tools"),
                        (forced, "tool_choice", "a call cannot be forced; use 'auto' (or 'none')"),
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
