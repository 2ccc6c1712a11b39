"""Tools through chat and serve: schemas rendered by the chat template, tool messages in the history, and
tool calls parsed out of answers in the convention the template itself writes (never by model name).

The tiny models' random weights write no tool calls, so the tests that parse calls script the engine's
text (`Scripted`, in place of `Engine.generate`): the prompt is still rendered by the real template, and
the text goes through the server's and the chat's real streaming and parsing.
"""

from __future__ import annotations

import io
import json
import logging
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from starlette.testclient import TestClient

from loratune.config import ModelConfig
from loratune.data.templates import TEMPLATES, ChatTemplate
from loratune.infer.engine import Delta, Finish
from loratune.infer.openai_api import Limits
from loratune.infer.sampling import SamplingParams
from loratune.infer.server import create_app
from loratune.infer.tools import CallSyntax, ToolCallStream, call_syntax, parse_calls
from loratune.model.load import load_tokenizer

WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "The weather in a city.",
                                            "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                           "required": ["city"]}}}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]
TAGGED = CallSyntax("<tool_call>", "</tool_call>", "arguments", False)
CALL_TEXT = 'Let me look.\n<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>'

# A Llama 3.1-style template: a call is the whole answer, as bare JSON with "parameters".
BARE_JSON = ChatTemplate(
    "bare", "{{ bos_token }}{% if tools %}<|start_header_id|>system<|end_header_id|>\n\n{% for t in tools %}"
    "{{ t | tojson }}\n{% endfor %}<|eot_id|>{% endif %}{% for m in messages %}<|start_header_id|>{{ m['role'] }}"
    "<|end_header_id|>\n\n{% if m.tool_calls %}{% for c in m.tool_calls %}{\"name\": \"{{ c.function.name }}\", "
    "\"parameters\": {{ c.function.arguments | tojson }}}{% endfor %}{% else %}{{ m['content'] }}{% endif %}"
    "<|eot_id|>{% endfor %}{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}",
    "<|eot_id|>")
# Mistral v3-style: a tag, then a JSON list of calls.
LISTED = ChatTemplate(
    "listed", "{% for m in messages %}{% if m.role == 'user' %}[INST]{{ m.content }}[/INST]{% elif m.tool_calls %}"
    "[TOOL_CALLS][{% for c in m.tool_calls %}{{ {'name': c.function.name, 'arguments': c.function.arguments} | tojson }}"
    "{% endfor %}]{{ eos_token }}{% else %}{{ m.content }}{{ eos_token }}{% endif %}{% endfor %}", "{eos}")
# Qwen3-style: an empty thinking block before the call in rendered history.
THINKING = ChatTemplate(
    "thinking", "{% for m in messages %}<|im_start|>{{ m.role }}\n{% if m.role == 'assistant' %}<think>\n\n</think>\n\n"
    "{% endif %}{{ m.content }}{% for c in m.tool_calls or [] %}\n<tool_call>\n{{ {'name': c.function.name, "
    "'arguments': c.function.arguments} | tojson }}\n</tool_call>{% endfor %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}", "<|im_end|>")
# Calls written in no JSON form, and a template that drops calls and tools altogether.
FUNCTION_STYLE = ChatTemplate(
    "fn-style", "{% for t in tools or [] %}tool {{ t.function.name }}\n{% endfor %}"
    "{% for m in messages %}{{ m.role }}: {{ m.content }}{% for c in m.tool_calls or [] %}"
    "CALL {{ c.function.name }}({{ c.function.arguments.values() | join(', ') }}){% endfor %}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant: {% endif %}", "\n")
TOOLLESS = ChatTemplate(
    "toolless", "{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n{{ m['content'] }}"
    "<|eot_id|>{% endfor %}{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}",
    "<|eot_id|>")


@pytest.fixture(scope="module")
def tokenizer(tiny_llama: Path):
    return load_tokenizer(ModelConfig(path=str(tiny_llama)))[0]


# ------------------------------------------------------------------------------ the convention, from the template


@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_every_built_in_template_writes_tagged_calls(tokenizer, name: str) -> None:
    assert call_syntax(tokenizer, TEMPLATES[name]) == TAGGED


@pytest.mark.parametrize("template, expected", [
    (BARE_JSON, CallSyntax("", "", "parameters", False)),
    (LISTED, CallSyntax("[TOOL_CALLS]", "", "arguments", True)),
    (THINKING, TAGGED),  # the tag is the word touching the JSON, not the thinking block before it
    (FUNCTION_STYLE, None),
    (TOOLLESS, None),
    (ChatTemplate("raises", "{{ raise_exception('no tools here') if messages[-1].tool_calls }}x", "x"), None),
])
def test_the_convention_is_read_from_the_templates_rendering(tokenizer, template: ChatTemplate, expected) -> None:
    assert call_syntax(tokenizer, template) == expected


@pytest.mark.parametrize("syntax, text, content, calls", [
    (TAGGED, CALL_TEXT, "Let me look.", [("get_weather", {"city": "Paris"})]),
    (TAGGED, ('<tool_call>{"name": "a", "arguments": {}}</tool_call>\n<tool_call>{"name": "b", "arguments": '
              '{"x": [1, 2]}}</tool_call>'), "", [("a", {}), ("b", {"x": [1, 2]})]),
    (TAGGED, '<tool_call>{"name": "a", "arguments": "{\\"k\\": 1}"}</tool_call>', "", [("a", {"k": 1})]),
    (TAGGED, '<tool_call>\n{"name": "a", "arguments": {}}\n', "", [("a", {})]),  # ended before the closing tag
    (TAGGED, "No call here.", "No call here.", []),
    (CallSyntax("", "", "parameters", False), ' {"name": "f", "parameters": {"q": "x"}}', "", [("f", {"q": "x"})]),
    (CallSyntax("", "", "parameters", False), '{"name": "f", "parameters": {}}; {"name": "g", "parameters": {}}', "",
     [("f", {}), ("g", {})]),
    (CallSyntax("", "", "parameters", False), "Plain words {not json}", "Plain words {not json}", []),
    (CallSyntax("[TOOL_CALLS]", "", "arguments", True),
     '[TOOL_CALLS][{"name": "f", "arguments": {"a": 1}}, {"name": "g", "arguments": {}}]', "", [("f", {"a": 1}), ("g", {})]),
])
def test_parse_calls(syntax: CallSyntax, text: str, content: str, calls: list) -> None:
    got_content, got = parse_calls(text, syntax)
    assert got_content == content
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in got] == calls
    assert all(c["type"] == "function" and c["id"].startswith("call_") for c in got)
    assert len({c["id"] for c in got}) == len(got)


@pytest.mark.parametrize("text", ['<tool_call>{"name": "a", "arguments": {</tool_call>',
                                  '<tool_call>{"arguments": {}}</tool_call>', '<tool_call>[1, 2]</tool_call>',
                                  '<tool_call>{"name": "", "arguments": {}}</tool_call>'])
def test_calls_that_do_not_parse_are_none(text: str) -> None:
    assert parse_calls(text, TAGGED) is None


@settings(max_examples=150, deadline=None)
@given(before=st.text(max_size=20), cuts=st.lists(st.integers(1, 200), max_size=12),
       syntax=st.sampled_from([TAGGED, CallSyntax("", "", "arguments", False)]))
def test_streamed_content_and_calls_equal_the_whole_answer_parsed(before: str, cuts: list[int], syntax) -> None:
    """However the answer is cut into pieces, what is streamed plus the tail is the content, and no piece of a
    call is ever shown as content."""
    call = '{"name": "get_weather", "arguments": {"city": "Paris"}}'
    text = (before + "\n<tool_call>" + call + "</tool_call>") if syntax.open else ("  " + call)
    stream, shown, at = ToolCallStream(syntax), [], 0
    for cut in sorted(set(cuts)) + [len(text)]:
        shown.append(stream.feed(text[at:cut]))
        at = max(at, cut)
    tail, calls = stream.finish()
    assert "<tool" not in "".join(shown) and '{"name"' not in "".join(shown)
    assert ("".join(shown) + tail).strip() == (before.strip() if syntax.open else "")
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls] == [
        ("get_weather", {"city": "Paris"})]


def test_text_without_a_call_streams_at_once_and_comes_back_whole() -> None:
    stream = ToolCallStream(TAGGED)
    assert stream.feed("Hello") == "Hello" and stream.feed(" world <") == " world"
    assert stream.feed("b>") == " <b>"
    assert stream.finish() == ("", [])
    broken = ToolCallStream(TAGGED)
    assert broken.feed('Sure <tool_call>{"name": oops') == "Sure"
    assert broken.finish() == (' <tool_call>{"name": oops', [])  # not a call after all: the text, whole


# ------------------------------------------------------------------------------------ the server, real templates


class Scripted:
    """Stands in for `Engine.generate`: each row answers the next scripted text, in pieces of 3 characters."""

    def __init__(self, *answers: str) -> None:
        self.answers, self.prompts = list(answers), []

    def __call__(self, prompts, params, name=None, cancel=None, ignore_eos=False) -> Iterator[Delta | Finish]:
        self.prompts.append([list(p) for p in prompts])
        text = self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]
        pieces = [text[i:i + 3] for i in range(0, len(text), 3)]
        for row, prompt in enumerate(prompts):
            for piece in pieces:
                yield Delta(row, piece, 0)
            yield Finish(row, "stop", len(prompt), len(pieces), 0)


def _client(engine) -> TestClient:
    return TestClient(create_app(engine, limits=Limits(max_tokens=8, default_max_tokens=4)),
                      raise_server_exceptions=False)


def _openai(client: TestClient) -> openai.OpenAI:
    return openai.OpenAI(api_key="unused", base_url="http://testserver/v1", http_client=client, max_retries=0)


HISTORY = ASK + [
    {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "type": "function", "function": {
        "name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
    {"role": "tool", "tool_call_id": "call_1", "content": "18 degrees and sunny"}]


def test_tools_and_tool_messages_are_rendered_as_training_renders_them(engine) -> None:
    """The prompt is the template's rendering of the data-shaped conversation (arguments as an object, the tool
    message named after its call), tools included."""
    fmt = engine.format("alpha")
    shaped = ASK + [{"role": "assistant", "content": "", "tool_calls": [{
        "id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
        {"role": "tool", "content": "18 degrees and sunny", "tool_call_id": "call_1", "name": "get_weather"}]
    expected = fmt.render(shaped, [WEATHER])
    text = fmt.tokenizer.decode(expected)
    assert '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>' in text
    assert "18 degrees and sunny" in text and '"description": "The weather in a city."' in text
    with _client(engine) as client:
        r = _openai(client).chat.completions.create(model="alpha", messages=HISTORY, tools=[WEATHER], max_tokens=2)
        plain = _openai(client).chat.completions.create(model="alpha", messages=ASK, max_tokens=2)
    assert r.usage.prompt_tokens == len(expected)
    assert plain.usage.prompt_tokens == len(fmt.render(ASK)) < len(fmt.render(ASK, [WEATHER]))


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral", "gemma"])
def test_a_tool_call_is_answered_as_openai_tool_calls(tiny_models, family: str, monkeypatch) -> None:
    from loratune.infer.load import load_engine

    eng = load_engine([str(tiny_models[family])])
    assert eng.format().tool_syntax == TAGGED
    scripted = Scripted(CALL_TEXT)
    monkeypatch.setattr(eng, "generate", scripted)
    with _client(eng) as client:
        r = _openai(client).chat.completions.create(model="base", messages=ASK, tools=[WEATHER], n=2)
    assert scripted.prompts[0][0] == eng.format().render(ASK, [WEATHER])  # the template saw the tools
    for choice in r.choices:
        assert choice.finish_reason == "tool_calls" and choice.message.content == "Let me look."
        (call,) = choice.message.tool_calls
        assert call.type == "function" and call.function.name == "get_weather"
        assert json.loads(call.function.arguments) == {"city": "Paris"}
    assert r.choices[0].message.tool_calls[0].id != r.choices[1].message.tool_calls[0].id


def test_streamed_tool_calls(engine, monkeypatch) -> None:
    monkeypatch.setattr(engine, "generate", Scripted(CALL_TEXT))
    with _client(engine) as client:
        chunks = list(_openai(client).chat.completions.create(model="alpha", messages=ASK, tools=[WEATHER], stream=True))
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    content = [d.content for d in deltas if d.content]
    assert "".join(content) == "Let me look." and len(content) > 1  # the text before the call streamed
    assert not any("<tool" in piece for piece in content)
    (with_calls,) = [d.tool_calls for d in deltas if d.tool_calls]
    assert [(c.index, c.function.name, json.loads(c.function.arguments)) for c in with_calls] == [
        (0, "get_weather", {"city": "Paris"})]
    assert with_calls[0].id.startswith("call_") and with_calls[0].type == "function"
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["tool_calls"]


@pytest.mark.parametrize("fields, why", [({}, "no tools in the request"), ({"tool_choice": "none"}, "tool_choice none")])
def test_calls_are_text_when_the_request_asks_for_none(engine, monkeypatch, fields: dict, why: str) -> None:
    monkeypatch.setattr(engine, "generate", Scripted(CALL_TEXT))
    with _client(engine) as client:
        body = {"model": "alpha", "messages": ASK, **({"tools": [WEATHER]} if fields else {}), **fields}
        r = client.post("/v1/chat/completions", json=body).json()
    assert r["choices"][0]["message"] == {"role": "assistant", "content": CALL_TEXT}, why
    assert r["choices"][0]["finish_reason"] == "stop"


def test_a_call_that_does_not_parse_comes_back_as_text(engine, monkeypatch) -> None:
    broken = 'Hm.\n<tool_call>{"name": "get_weather", "arguments": {"city": </tool_call>'
    monkeypatch.setattr(engine, "generate", Scripted(broken))
    with _client(engine) as client:
        r = client.post("/v1/chat/completions", json={"model": "alpha", "messages": ASK, "tools": [WEATHER]}).json()
        s = client.post("/v1/chat/completions", json={"model": "alpha", "messages": ASK, "tools": [WEATHER],
                                                      "stream": True})
    assert r["choices"][0]["message"] == {"role": "assistant", "content": broken}
    assert r["choices"][0]["finish_reason"] == "stop"
    events = [json.loads(line[6:]) for line in s.text.splitlines() if line.startswith("data: {")]
    assert "".join(e["choices"][0]["delta"].get("content") or "" for e in events if e["choices"]) == broken


def _model_with_template(tiny_llama: Path, out: Path, template: ChatTemplate) -> Path:
    shutil.copytree(tiny_llama, out)
    tok = load_tokenizer(ModelConfig(path=str(tiny_llama)))[0]
    tok.chat_template = template.jinja
    tok.save_pretrained(out)
    return out


def test_bare_json_template_calls_are_parsed(tiny_llama, tmp_path, monkeypatch) -> None:
    from loratune.infer.load import load_engine

    eng = load_engine([str(_model_with_template(tiny_llama, tmp_path / "bare", BARE_JSON))])
    assert eng.format().tool_syntax == CallSyntax("", "", "parameters", False)
    monkeypatch.setattr(eng, "generate", Scripted('{"name": "get_weather", "parameters": {"city": "Paris"}}',
                                                  "It is sunny."))
    with _client(eng) as client:
        call = client.post("/v1/chat/completions", json={"model": "base", "messages": ASK, "tools": [WEATHER]}).json()
        text = client.post("/v1/chat/completions", json={"model": "base", "messages": ASK, "tools": [WEATHER],
                                                         "stream": True})
    message = call["choices"][0]["message"]
    assert message["content"] is None and call["choices"][0]["finish_reason"] == "tool_calls"
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in message["tool_calls"]] == [
        ("get_weather", {"city": "Paris"})]
    events = [json.loads(line[6:]) for line in text.text.splitlines() if line.startswith("data: {")]
    assert "".join(e["choices"][0]["delta"].get("content") or "" for e in events if e["choices"]) == "It is sunny."


def test_unrecognised_convention_answers_text_and_says_so_once(tiny_llama, tmp_path, monkeypatch, caplog) -> None:
    from loratune.infer.load import load_engine

    eng = load_engine([str(_model_with_template(tiny_llama, tmp_path / "fn", FUNCTION_STYLE))])
    monkeypatch.setattr(eng, "generate", Scripted("CALL get_weather(Paris)"))
    with caplog.at_level(logging.WARNING, logger="loratune.infer.server"), _client(eng) as client:
        answers = [client.post("/v1/chat/completions", json={"model": "base", "messages": ASK, "tools": [WEATHER]})
                   .json() for _ in range(2)]
    assert [a["choices"][0]["message"]["content"] for a in answers] == ["CALL get_weather(Paris)"] * 2
    notes = [r.getMessage() for r in caplog.records if "tool calls in no form" in r.getMessage()]
    assert notes == [("model 'base': its chat template writes tool calls in no form loratune recognises; answers to "
                      "requests with tools come back as text content")]


def test_a_template_that_drops_tools_is_refused(tiny_llama, tmp_path) -> None:
    from loratune.infer.load import load_engine

    eng = load_engine([str(_model_with_template(tiny_llama, tmp_path / "toolless", TOOLLESS))])
    with _client(eng) as client:
        tools = client.post("/v1/chat/completions", json={"model": "base", "messages": ASK, "tools": [WEATHER]})
        calls = client.post("/v1/chat/completions", json={"model": "base", "messages": HISTORY})
        plain = client.post("/v1/chat/completions", json={"model": "base", "messages": ASK, "max_tokens": 2})
    assert tools.status_code == 400 and tools.json()["error"]["param"] == "tools"
    assert "leaves out the tool schemas" in tools.json()["error"]["message"]
    assert calls.status_code == 400 and calls.json()["error"]["param"] == "messages"
    assert "leaves out the tool calls" in calls.json()["error"]["message"]
    assert plain.status_code == 200


@pytest.mark.parametrize("patch, param, words", [
    ({"messages": ASK + [{"role": "tool", "tool_call_id": "call_9", "content": "x"}]}, "messages.1.tool_call_id",
     "answers no tool call"),
    ({"messages": ASK + [{"role": "tool", "content": "x"}]}, "messages.1", "needs the tool_call_id"),
    ({"messages": [{"role": "user", "content": "x", "tool_calls": HISTORY[1]["tool_calls"]}]}, "messages.0",
     "belong to assistant messages"),
    ({"messages": ASK + [{"role": "assistant", "content": None}]}, "messages.1", "content"),
    ({"messages": ASK + [{"role": "assistant", "tool_calls": [{"id": "c", "type": "function", "function": {
        "name": "f", "arguments": "{not json"}}]}]}, "messages.1.tool_calls.0.function.arguments", "JSON object"),
    ({"messages": ASK + [{"role": "assistant", "tool_calls": [{"id": "c", "type": "function", "function": {
        "name": "f", "arguments": "[1]"}}]}]}, "messages.1.tool_calls.0.function.arguments", "JSON object"),
    ({"tools": [{"type": "function", "function": {"name": "has space"}}]}, "tools.0.function.name", "pattern"),
    ({"tools": [{"type": "retrieval", "function": {"name": "f"}}]}, "tools.0.type", "function"),
    ({"tools": [WEATHER], "tool_choice": "required"}, "tool_choice", "cannot be forced"),
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "get_weather"}}}, "tool_choice",
     "cannot be forced"),
    ({"functions": [WEATHER["function"]]}, "functions", "use tools"),
])
def test_malformed_tool_requests_are_400(engine, patch: dict, param: str, words: str) -> None:
    with _client(engine) as client:
        r = client.post("/v1/chat/completions", json={"model": "alpha", "messages": ASK, **patch})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param and words in r.json()["error"]["message"]


# ------------------------------------------------------------------------------------------------------- chat


def test_chat_reads_tools_and_prints_calls_on_their_own_lines(engine, tmp_path, monkeypatch, capsys) -> None:
    from loratune.infer import chat, load

    tools = tmp_path / "tools.json"
    tools.write_text(json.dumps([WEATHER, {"name": "bare_function", "parameters": {}}]))
    scripted = Scripted(CALL_TEXT)
    monkeypatch.setattr(engine, "generate", scripted)
    monkeypatch.setattr(load, "load_engine", lambda sources, bits=None, **kw: engine)
    assert chat.run_chat(["ignored"], name="alpha", prompt="What is the weather in Paris?", tools_file=tools) == 0
    assert capsys.readouterr().out == 'Let me look.\n[tool call] get_weather {"city": "Paris"}\n'
    wrapped = [WEATHER, {"type": "function", "function": {"name": "bare_function", "parameters": {}}}]
    assert scripted.prompts[0][0] == engine.format("alpha").render(
        [{"role": "user", "content": "What is the weather in Paris?"}], wrapped)


def test_interactive_tool_round_trip(engine, monkeypatch) -> None:
    """A call, its result given with /tool, and the model's next answer, which saw both."""
    from loratune.infer.chat import interactive

    scripted = Scripted(CALL_TEXT, "It is 18 degrees.")
    monkeypatch.setattr(engine, "generate", scripted)
    monkeypatch.setattr(sys, "stdin", io.StringIO("What is the weather in Paris?\n/tool 18 degrees\n/tool again\n"))
    out = io.StringIO()
    assert interactive(engine, "alpha", SamplingParams(), None, out=out, tools=[WEATHER]) == 0
    text = out.getvalue()
    assert 'Let me look.\n[tool call] get_weather {"city": "Paris"}\n' in text
    assert "It is 18 degrees.\n" in text and "error: /tool answers a tool call, and none is waiting" in text
    second = engine.format("alpha").tokenizer.decode(scripted.prompts[1][0])
    assert '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>' in second
    assert "18 degrees" in second and second.index("Let me look.") < second.index("18 degrees")


@pytest.mark.parametrize("content, words", [
    (None, "cannot read it"), ("{not json", "not valid JSON"), ('{"name": "f"}', "non-empty JSON list"),
    ("[]", "non-empty JSON list"), ('[{"type": "function", "function": {"name": "bad name"}}]', "item 0"),
    ('[{"name": "f", "parameters": "x"}]', "item 0 (f): parameters must be a JSON schema object"),
])
def test_bad_tools_files_are_one_line_errors(tmp_path, content: str | None, words: str) -> None:
    from loratune.errors import LoratuneError
    from loratune.infer.chat import read_tools

    path = tmp_path / "tools.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(LoratuneError, match="--tools") as e:
        read_tools(path)
    assert words in str(e.value) and "\n" not in str(e.value)


def test_chat_cli_takes_tools(tmp_path, capsys) -> None:
    """`loratune chat --tools FILE` reaches run_chat: a malformed file is a one-line error, exit 2, before loading."""
    from loratune.cli import main

    path = tmp_path / "tools.json"
    path.write_text("[]")
    assert main(["chat", "demo://llama-test", "--tools", str(path), "--prompt", "hi"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "--tools" in err and "non-empty JSON list" in err and err.count("\n") == 1
