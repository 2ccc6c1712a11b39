"""`POST /v1/rewards`: `loratune serve --reward NAME=RUN` scores conversations with reward models.

A reward model (a run of train.method rm; a policy run scores by its implicit reward) is loaded as training built
it (`loratune.pref.scoring`), beside the chat engine, and answers only this route. A request names it in `model` and gives the items to score:

    {"model": "rm", "messages": [{"role": "user", ...}, {"role": "assistant", ...}]}     one conversation
    {"model": "rm", "messages": [[...], [...]]}                                          several
    {"model": "rm", "prompt": "Q" | ["Q1", ...], "completion": "A" | ["A1", ...]}        prompt/answer pairs

Each conversation ends with the assistant answer that is scored (the reward model's chat template renders it as
training rendered one); a text prompt is one user message, a text completion one assistant message, and one
prompt may go with several completions. The answer is one scalar per item, in order, computed in micro-batches
(`--reward-batch-size`):

    {"object": "list", "model": "rm", "data": [{"object": "reward", "index": 0, "score": 1.23, "tokens": 17,
     "truncated": false}, ...], "usage": {"prompt_tokens": 17, "total_tokens": 17}}

Errors are OpenAI's error JSON: 404 for an unknown reward model, 400 naming the item (`messages.2`, `completion.1`)
for a malformed, unrenderable or too long one (longer than the run's `data.max_length` when its truncation policy
is `drop`; otherwise it is cut as training cut it and marked `truncated`), 413 for more than `max_items` items.
Scoring runs in a worker thread, one request at a time per reward model, so generation keeps its event loop.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import Field, model_validator
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request

from loratune.data.render import RenderError
from loratune.errors import LoratuneError
from loratune.infer.asgi import read_json
from loratune.infer.openai_api import APIError, Message, _Base, parse
from loratune.pref.scoring import RewardScorer, TooLong


class RewardRequest(_Base):
    model: str
    messages: list[Message] | list[list[Message]] | None = None
    prompt: str | list[str] | None = None
    completion: str | list[str] | None = None
    tools: list[dict] | None = Field(None, max_length=128)

    @model_validator(mode="after")
    def _one_form(self) -> RewardRequest:
        if (self.messages is None) == (self.completion is None):
            raise ValueError("give either `messages` (a conversation or a list of them) or `prompt` and `completion`")
        if self.messages is None and self.prompt is None:
            raise ValueError("`completion` needs a `prompt` (a text, or one text per completion)")
        if self.messages is not None and self.prompt is not None:
            raise ValueError("`prompt` goes with `completion`; with `messages` the prompt is in the conversation")
        return self

    def conversations(self) -> list[tuple[str, list[dict]]]:
        """(name of the item for errors, its messages), in order."""
        if self.messages is not None:
            if self.messages and isinstance(self.messages[0], Message):  # one conversation
                return [("messages", [m.as_dict() for m in self.messages])]  # type: ignore[union-attr]
            return [(f"messages.{i}", [m.as_dict() for m in conv]) for i, conv in enumerate(self.messages)]  # type: ignore[union-attr]
        completions = [self.completion] if isinstance(self.completion, str) else list(self.completion or [])
        prompts = [self.prompt] if isinstance(self.prompt, str) else list(self.prompt or [])
        if len(prompts) == 1:
            prompts = prompts * len(completions)
        if len(prompts) != len(completions):
            raise APIError(400, f"prompt: {len(prompts)} prompts for {len(completions)} completions; give one prompt, "
                                "or one per completion", param="prompt")
        key = "completion" if isinstance(self.completion, str) else "completion.{}"
        return [(key.format(i), [{"role": "user", "content": p}, {"role": "assistant", "content": c}])
                for i, (p, c) in enumerate(zip(prompts, completions))]


def _score(scorer: RewardScorer, items: list[tuple[str, list[dict]]], tools: list | None,
           batch_size: int) -> list[dict]:
    samples, truncated = [], []
    for where, messages in items:
        if not messages or messages[-1]["role"] != "assistant":
            last = messages[-1]["role"] if messages else "nothing"
            raise APIError(400, f"{where}: a scored conversation ends with the assistant answer it scores; it ends "
                                f"with {last}", param=where)
        try:
            sample, cut = scorer.sample(messages, tools)
        except (RenderError, TooLong) as e:
            raise APIError(400, f"{where}: {e}", param=where) from None
        except Exception as e:  # the chat template itself rejects the conversation (e.g. role order)
            raise APIError(400, f"{where}: the reward model's chat template cannot render it: {e}", param=where) from None
        samples.append(sample)
        truncated.append(cut)
    scores = scorer.rewards(samples, batch_size)
    return [{"object": "reward", "index": i, "score": s, "tokens": len(x.input_ids), "truncated": t}
            for i, (s, x, t) in enumerate(zip(scores, samples, truncated))]


def load_reward_models(specs: list[str] | tuple[str, ...]) -> dict[str, RewardScorer]:
    """`[NAME=]FOLDER` reward-model runs, loaded (named after their folder unless NAME= is given)."""
    folders: dict[str, str] = {}
    for spec in specs:  # every name checked before anything loads
        name, sep, folder = spec.partition("=")
        name, folder = (name, folder) if sep else (Path(spec).resolve().name, spec)
        if not name or name in folders:
            raise LoratuneError(f"--reward {spec}: " + ("the name before '=' is empty" if not name else
                                f"the name {name!r} is taken; give each reward model its own NAME="))
        folders[name] = folder
    return {name: RewardScorer.load(folder) for name, folder in folders.items()}


def add_reward_routes(app: Any, scorers: dict[str, RewardScorer], *, max_body_bytes: int, max_items: int = 64,
                      batch_size: int = 8) -> None:
    """Register `POST /v1/rewards` on the server's app (its error handlers answer the `APIError`s raised here)."""

    @app.post("/v1/rewards")
    async def rewards(request: Request) -> dict:
        req = parse(RewardRequest, await read_json(request, max_body_bytes))
        if req.model not in scorers:
            served = ", ".join(scorers) or "none (start the server with --reward NAME=RUN)"
            raise APIError(404, f"The reward model '{req.model}' does not exist; reward models: {served}",
                           param="model", code="model_not_found")
        items = req.conversations()
        if not items:
            raise APIError(400, "nothing to score: the list is empty", param="messages" if req.messages is not None
                           else "completion")
        if len(items) > max_items:
            raise APIError(413, f"{len(items)} items in one request; the limit is {max_items}")
        data = await run_in_threadpool(_score, scorers[req.model], items, req.tools, batch_size)
        tokens = sum(d["tokens"] for d in data)
        return {"object": "list", "model": req.model, "data": data,
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}
