"""The server under hostile input: each class of bad request, several instances each, is a JSON 4xx in
OpenAI's error shape; a fuzz test over random JSON bodies finds no 5xx and no answer that is not JSON.

The classes (fixed as classes in `infer/asgi.py`, `infer/openai_api.py` and `infer/sampling.py`, not per
field): text that is not valid Unicode (lone surrogates from `\\ud800` escapes) in any string, keys too;
JSON nested thousands deep; integers beyond 64 bits and non-finite numbers in any numeric position;
floats in range that underflow the sampler; bodies not declared `application/json` (415: a web page can
post `text/plain` to a localhost server without a CORS preflight). A 5xx remains only for a server fault,
and is JSON too.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from starlette.testclient import TestClient

from loratune.infer.openai_api import Limits
from loratune.infer.server import create_app

CHAT, COMPLETIONS = "/v1/chat/completions", "/v1/completions"
MSGS = [{"role": "user", "content": "Hi"}]
JSON = {"Content-Type": "application/json"}


@pytest.fixture(scope="module")
def client(engine) -> Iterator[TestClient]:
    limits = Limits(max_tokens=4, default_max_tokens=2, max_n=2, max_batch=4, max_body_bytes=256 * 1024)
    with TestClient(create_app(engine, limits=limits), raise_server_exceptions=False) as c:
        yield c


def post(client: TestClient, path: str, body: str | bytes | dict, headers: dict | None = None):
    content = json.dumps(body) if isinstance(body, dict) else body
    return client.post(path, content=content, headers=JSON if headers is None else headers)


def error(r, status: int) -> dict:
    """The response is `status` with OpenAI's error body; returns the error object."""
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/json")
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    return body["error"]


def chat(**fields) -> dict:
    return {"model": "alpha", "messages": MSGS, "max_tokens": 2, **fields}


def completion(**fields) -> dict:
    return {"model": "alpha", "prompt": "Hi", "max_tokens": 2, **fields}


# --------------------------------------------------------------------------------- text that is not Unicode

LONE = "\ud800"  # json.dumps writes it as the escape \ud800, which json.loads turns back into a lone surrogate


@pytest.mark.parametrize("path, body, param", [
    (CHAT, chat(messages=[{"role": "user", "content": "a" + LONE}]), "messages.0.content"),
    (CHAT, chat(messages=[{"role": "system", "content": "ok"}, {"role": "user", "content": "\udfff"}]),
     "messages.1.content"),
    (CHAT, chat(messages=[{"role": "user", "content": [{"type": "text", "text": LONE + "x"}]}]),
     "messages.0.content.0.text"),
    (CHAT, chat(messages=[{"role": "user" + LONE, "content": "x"}]), "messages.0.role"),
    (CHAT, chat(stop=LONE), "stop"),
    (CHAT, chat(stop=["fine", "x" + LONE]), "stop.1"),
    (CHAT, chat(model=LONE), "model"),
    (CHAT, chat(user=LONE), "user"),
    (CHAT, chat(tools=[{"type": "function", "function": {"name": "f" + LONE, "parameters": {}}}]),
     "tools.0.function.name"),
    (CHAT, chat(metadata={"anything": [LONE]}), "metadata.anything.0"),  # an unknown field is text too
    (COMPLETIONS, completion(prompt="\udc80"), "prompt"),
    (COMPLETIONS, completion(prompt=["ok", LONE]), "prompt.1"),
    (COMPLETIONS, completion(suffix=LONE), "suffix"),
])
def test_lone_surrogates_in_any_string_are_400(client, path: str, body: dict, param: str) -> None:
    err = error(post(client, path, body), 400)
    assert err["param"] == param and "lone surrogate" in err["message"] and err["type"] == "invalid_request_error"


def test_a_lone_surrogate_in_a_key_is_400(client) -> None:
    err = error(post(client, CHAT, '{"model": "alpha", "messages": [], "\\ud83d": 1}'), 400)
    assert "key '\\ud83d'" in err["message"] and err["param"] is None


def test_paired_surrogate_escapes_are_fine(client) -> None:
    """`\\ud83d\\ude00` is one character (an emoji), not a lone surrogate."""
    r = post(client, CHAT, '{"model": "alpha", "max_tokens": 2, "messages": [{"role": "user", "content": "\\ud83d\\ude00"}]}')
    assert r.status_code == 200, r.text


# ------------------------------------------------------------------------------------------- deep nesting


@pytest.mark.parametrize("depth", [65, 1000, 5000, 100_000])
@pytest.mark.parametrize("field", ["messages", "tools", "stop", "metadata"])
def test_json_nested_thousands_deep_is_400(client, depth: int, field: str) -> None:
    body = f'{{"model": "alpha", "{field}": {"[" * depth}{"]" * depth}}}'
    err = error(post(client, CHAT, body), 400)
    assert "nested deeper than 64 levels" in err["message"]
    assert err["param"] in (field, None)  # None: so deep the JSON decoder itself gave up


def test_deep_objects_and_a_deep_top_level_are_400(client) -> None:
    deep_obj = '{"a":' * 3000 + "1" + "}" * 3000
    assert "nested deeper" in error(post(client, COMPLETIONS, deep_obj), 400)["message"]
    assert "nested deeper" in error(post(client, CHAT, "[" * 70 + "]" * 70), 400)["message"]


# ------------------------------------------------------------------------------ numbers beyond 64 bits, inf


@pytest.mark.parametrize("path, body, param", [
    (COMPLETIONS, completion(seed=2**63), "seed"),
    (COMPLETIONS, completion(seed=-(2**63) - 1), "seed"),
    (COMPLETIONS, completion(seed=2**200), "seed"),
    (COMPLETIONS, completion(max_tokens=2**64), "max_tokens"),
    (COMPLETIONS, completion(prompt=[1, 2, 2**70]), "prompt.2"),
    (COMPLETIONS, completion(prompt=[[5], [2**64]]), "prompt.1.0"),
    (COMPLETIONS, completion(logprobs=2**99), "logprobs"),
    (CHAT, chat(n=-(2**80)), "n"),
    (CHAT, chat(top_k=2**64 + 1), "top_k"),
    (CHAT, chat(max_completion_tokens=10**30), "max_completion_tokens"),
    (CHAT, chat(metadata={"x": [2**65]}), "metadata.x.0"),
])
def test_integers_beyond_64_bits_are_400(client, path: str, body: dict, param: str) -> None:
    err = error(post(client, path, body), 400)
    assert err["param"] == param and "does not fit in 64 bits" in err["message"]


@pytest.mark.parametrize("seed", [2**63 - 1, -(2**63), 0, -1])
def test_seeds_at_the_64_bit_edges_are_served(client, seed: int) -> None:
    r = post(client, COMPLETIONS, completion(seed=seed, temperature=1.0))
    assert r.status_code == 200, r.text


@pytest.mark.parametrize("number, param", [("1e400", "temperature"), ("-1e999", "temperature"),
                                           ("NaN", None), ("Infinity", None), ("-Infinity", None)])
def test_non_finite_numbers_are_400(client, number: str, param: str | None) -> None:
    err = error(post(client, COMPLETIONS, f'{{"model": "alpha", "prompt": "x", "temperature": {number}}}'), 400)
    assert err["param"] == param and ("not finite" in err["message"] or "not a JSON number" in err["message"])


@pytest.mark.parametrize("field, value", [("max_tokens", "2"), ("max_tokens", True), ("temperature", True),
                                          ("n", 1.5), ("stream", "yes"), ("seed", 1e300), ("model", 5)])
def test_values_of_the_wrong_json_type_are_400_not_converted(client, field: str, value: object) -> None:
    assert error(post(client, COMPLETIONS, completion(**{field: value})), 400)["param"] == field


# ------------------------------------------------------------------ floats in range that underflow sampling


def _text(r) -> str:
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["text"]


@pytest.mark.parametrize("settings_", [{"temperature": 1e-300}, {"temperature": 5e-324},
                                       {"temperature": 1.0, "top_p": 1e-320}, {"temperature": 2.0, "top_p": 5e-324},
                                       {"temperature": 1e-300, "top_p": 1e-320, "top_k": 1}])
def test_vanishing_temperature_or_top_p_answers_greedily(client, settings_: dict) -> None:
    greedy = _text(post(client, COMPLETIONS, completion(temperature=0, max_tokens=4, ignore_eos=True)))
    for seed in (1, 2):
        body = completion(max_tokens=4, ignore_eos=True, seed=seed, **settings_)
        assert _text(post(client, COMPLETIONS, body)) == greedy


@pytest.mark.parametrize("settings_", [{"repetition_penalty": 1e-300, "temperature": 1.0},
                                       {"repetition_penalty": 5e-324, "temperature": 0.5},
                                       {"repetition_penalty": 1e-300, "temperature": 1e-300}])
def test_vanishing_repetition_penalty_is_served(client, settings_: dict) -> None:
    assert isinstance(_text(post(client, COMPLETIONS, completion(seed=3, **settings_))), str)
    chat_r = post(client, CHAT, chat(seed=3, stream=True, **settings_))
    assert chat_r.status_code == 200 and chat_r.text.rstrip().endswith("data: [DONE]")
    assert "server_error" not in chat_r.text


# ------------------------------------------------------------------------------------------ content type


@pytest.mark.parametrize("content_type", [None, "text/plain", "text/plain;charset=UTF-8",
                                          "application/x-www-form-urlencoded", "multipart/form-data; boundary=x",
                                          "text/json", "application/jsonp", "application/json-seq"])
@pytest.mark.parametrize("path", [CHAT, COMPLETIONS])
def test_bodies_not_declared_json_are_415(client, path: str, content_type: str | None) -> None:
    body = json.dumps(chat() if path == CHAT else completion())
    err = error(post(client, path, body, headers={} if content_type is None else {"Content-Type": content_type}), 415)
    assert "application/json" in err["message"] and err["code"] == "unsupported_media_type"


@pytest.mark.parametrize("content_type", ["application/json", "application/json; charset=utf-8", "Application/JSON"])
def test_json_content_types_are_accepted(client, content_type: str) -> None:
    assert post(client, CHAT, chat(), headers={"Content-Type": content_type}).status_code == 200


# ------------------------------------------------------------------------------ other malformed requests


@pytest.mark.parametrize("body", [b"", b"{", b"\xff\xfe\x00", b'{"model": "alpha"', b"null", b"[]", b'"text"',
                                  b"\xef\xbb\xbf{}", b'{"model": "alpha", "messages": "Hi"}'])
def test_malformed_json_bodies_are_400(client, body: bytes) -> None:
    error(post(client, CHAT, body), 400)


@pytest.mark.parametrize("message, param", [({"role": "user", "content": None}, "messages.0"),
                                            ({"role": "system"}, "messages.0"),
                                            ({"role": "user", "content": 5}, "messages.0.content"),
                                            ({"content": "x"}, "messages.0.role"),
                                            ({"role": "user", "content": [{"type": "image_url"}]}, "messages.0.content")])
def test_messages_without_valid_content_are_400(client, message: dict, param: str) -> None:
    assert error(post(client, CHAT, chat(messages=[message])), 400)["param"] == param


def test_wrong_methods_and_paths_are_json(client) -> None:
    assert error(client.get(CHAT), 405)["message"]
    assert error(client.put("/v1/models"), 405)["message"]
    assert error(client.options(CHAT), 405)["message"]  # no CORS preflight is granted
    assert error(client.get("/v1/nothing"), 404)["code"] == "not_found"


# ------------------------------------------------------------------------------ a 5xx: a real fault, JSON


def test_a_fault_in_a_route_is_a_json_500(client, engine, monkeypatch) -> None:
    def broken(name=None):
        raise KeyError("a bug")

    monkeypatch.setattr(engine, "format", broken)
    err = error(post(client, CHAT, chat()), 500)
    assert err["type"] == "server_error" and err["message"] == "internal server error: KeyError"


def test_a_fault_in_generation_is_a_json_500(client, engine, monkeypatch) -> None:
    def broken(*args, **kwargs):
        raise RuntimeError("out of memory")
        yield

    monkeypatch.setattr(engine, "generate", broken)
    err = error(post(client, COMPLETIONS, completion()), 500)
    assert err["type"] == "server_error" and "RuntimeError: out of memory" in err["message"]


# -------------------------------------------------------------------------------------------------- fuzz

_odd_text = st.one_of(st.text(max_size=12), st.sampled_from(["\ud800", "a\udfffb", "\x00", "\u202e", "é" * 5]))
_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | _odd_text,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(_odd_text, inner, max_size=4),
    max_leaves=16)
_message = st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "assistant", "tool", "x"]) | _json},
                                 optional={"content": _odd_text | _json, "name": _json, "tool_calls": _json,
                                           "tool_call_id": _json})
_fields = {
    "model": st.sampled_from(["alpha", "base", "beta", "nope", ""]) | _json,
    "messages": st.lists(_message, max_size=3) | _json,
    "prompt": _odd_text | st.lists(st.integers(-5, 600), max_size=5) | st.lists(_odd_text, max_size=3) | _json,
    "max_tokens": st.integers(-2, 6) | _json, "max_completion_tokens": st.integers(-2, 6) | _json,
    "temperature": st.floats(-1, 3) | st.sampled_from([1e-300, 5e-324]) | _json,
    "top_p": st.floats(-1, 2) | st.sampled_from([1e-320, 5e-324]) | _json,
    "top_k": st.integers(-3, 2**70) | _json, "n": st.integers(-1, 3) | _json,
    "repetition_penalty": st.floats(0, 11) | st.sampled_from([1e-300, 5e-324]) | _json,
    "seed": st.integers() | _json, "stop": _odd_text | st.lists(_odd_text, max_size=5) | _json,
    "stream": st.booleans() | _json, "stream_options": st.fixed_dictionaries({"include_usage": st.booleans()}) | _json,
    "ignore_eos": st.booleans() | _json, "tools": _json, "tool_choice": _json, "response_format": _json,
    "logprobs": _json, "echo": _json, "suffix": _json, "user": _odd_text | _json,
}
_bases = st.sampled_from([{}, {"model": "alpha", "messages": MSGS}, {"model": "base", "prompt": "Hi"}] * 2
                         + [{"model": "beta", "messages": MSGS, "max_tokens": 2}, {"model": "alpha", "prompt": [1, 2]}])
_changes = st.lists(st.sampled_from(sorted(_fields)), max_size=3, unique=True).flatmap(
    lambda keys: st.fixed_dictionaries({k: _fields[k] for k in keys}))  # a few fields changed at a time
_bodies = st.builds(lambda base, fields: {**base, **fields}, _bases, _changes) | _json


def _assert_json_answer(r) -> None:
    assert r.status_code < 500, r.text
    if r.headers["content-type"].startswith("text/event-stream"):
        events = [line[6:] for line in r.text.splitlines() if line.startswith("data: ")]
        assert events and events[-1] == "[DONE]"
        for event in events[:-1]:
            assert "error" not in json.loads(event)
    else:
        assert r.headers["content-type"].startswith("application/json")
        body = r.json()
        if r.status_code >= 400:
            assert set(body) == {"error"} and body["error"]["message"]


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                   HealthCheck.too_slow])
@given(path=st.sampled_from([CHAT, COMPLETIONS]), body=_bodies,
       content_type=st.sampled_from(["application/json"] * 6 + ["text/plain", None]))
def test_fuzz_random_json_bodies_never_give_a_5xx(client, path: str, body: object, content_type: str | None) -> None:
    headers = {} if content_type is None else {"Content-Type": content_type}
    r = client.post(path, content=json.dumps(body), headers=headers)
    event(f"status {r.status_code}")  # --hypothesis-show-statistics: how many got as far as an answer
    _assert_json_answer(r)
    if content_type != "application/json":
        assert r.status_code == 415


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(raw=st.binary(max_size=64))
def test_fuzz_random_bytes_never_give_a_5xx(client, raw: bytes) -> None:
    _assert_json_answer(client.post(CHAT, content=raw, headers=JSON))
