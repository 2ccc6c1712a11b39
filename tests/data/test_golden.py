"""Golden tests: exact text, token ids and labels of one multi-turn conversation per template and family.

The expected *texts* and supervised spans are written out by hand here, independently of the code; the
exact ids and labels are pinned in golden/*.json (regenerate with LORATUNE_UPDATE_GOLDEN=1 after an
intended change, and review the diff).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from loratune.data.render import IGNORE, render_conversation
from loratune.data.templates import TEMPLATES, resolve_template

GOLDEN = Path(__file__).parent / "golden"
CONV = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "Paris."},
    {"role": "user", "content": "And of Italy?"},
    {"role": "assistant", "content": "Rome."},
]
Q1, Q2 = "What is the capital of France?", "And of Italy?"

# template -> (tokenizer family it is paired with, exact rendered text, supervised text runs)
EXPECTED = {
    "llama3": ("llama",
               "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nYou are terse.<|eot_id|>"
               f"<|start_header_id|>user<|end_header_id|>\n\n{Q1}<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"
               f"Paris.<|eot_id|><|start_header_id|>user<|end_header_id|>\n\n{Q2}<|eot_id|>"
               "<|start_header_id|>assistant<|end_header_id|>\n\nRome.<|eot_id|>",
               ["Paris.<|eot_id|>", "Rome.<|eot_id|>"]),
    "chatml": ("qwen2",
               f"<|im_start|>system\nYou are terse.<|im_end|>\n<|im_start|>user\n{Q1}<|im_end|>\n<|im_start|>assistant\n"
               f"Paris.<|im_end|>\n<|im_start|>user\n{Q2}<|im_end|>\n<|im_start|>assistant\nRome.<|im_end|>\n",
               ["Paris.<|im_end|>", "Rome.<|im_end|>"]),
    "mistral": ("mistral", f"<s>[INST] You are terse.\n\n{Q1} [/INST]Paris.</s>[INST] {Q2} [/INST]Rome.</s>",
                ["Paris.</s>", "Rome.</s>"]),
    "gemma": ("gemma",
              f"<bos><start_of_turn>user\nYou are terse.\n\n{Q1}<end_of_turn>\n<start_of_turn>model\nParis.<end_of_turn>\n"
              f"<start_of_turn>user\n{Q2}<end_of_turn>\n<start_of_turn>model\nRome.<end_of_turn>\n",
              ["Paris.<end_of_turn>", "Rome.<end_of_turn>"]),
    "phi3": ("mistral",
             f"<s><|system|>\nYou are terse.<|end|>\n<|user|>\n{Q1}<|end|>\n<|assistant|>\nParis.<|end|>\n"
             f"<|user|>\n{Q2}<|end|>\n<|assistant|>\nRome.<|end|>\n",
             ["Paris.<|end|>", "Rome.<|end|>"]),
    "zephyr": ("mistral",
               f"<s><|system|>\nYou are terse.</s>\n<|user|>\n{Q1}</s>\n<|assistant|>\nParis.</s>\n"
               f"<|user|>\n{Q2}</s>\n<|assistant|>\nRome.</s>\n",
               ["Paris.</s>", "Rome.</s>"]),
    "plain": ("mistral", f"<s>You are terse.{Q1}Paris.</s>{Q2}Rome.</s>", ["Paris.</s>", "Rome.</s>"]),
    "alpaca": ("mistral",
               f"<s>You are terse.\n\n### Instruction:\n{Q1}\n\n### Response:\nParis.</s>\n\n"
               f"### Instruction:\n{Q2}\n\n### Response:\nRome.</s>\n\n",
               ["Paris.</s>", "Rome.</s>"]),
    "vicuna": ("mistral", f"<s>You are terse. USER: {Q1} ASSISTANT: Paris.</s>USER: {Q2} ASSISTANT: Rome.</s>",
               [" Paris.</s>", " Rome.</s>"]),
    "guanaco": ("mistral", f"<s>You are terse.\n### Human: {Q1}### Assistant: Paris.</s>### Human: {Q2}### Assistant: Rome.</s>",
                [" Paris.</s>", " Rome.</s>"]),
}


def supervised_runs(tok, ids: list[int], labels: list[int]) -> list[str]:
    runs, cur = [], []
    for i, label in zip(ids, labels):
        if label != IGNORE:
            assert label == i
            cur.append(i)
        elif cur:
            runs.append(tok.decode(cur)), cur.clear()
    return runs + ([tok.decode(cur)] if cur else [])


def check_golden(name: str, key: str, ids: list[int], labels: list[int]) -> None:
    path = GOLDEN / f"{name}.json"
    table = json.loads(path.read_text()) if path.exists() else {}
    if os.environ.get("LORATUNE_UPDATE_GOLDEN") == "1":
        table[key] = {"ids": ids, "labels": labels}
        path.write_text("{\n" + ",\n".join(f"{json.dumps(k)}: {json.dumps(v)}" for k, v in sorted(table.items()))
                        + "\n}\n")
    assert key in table, f"no golden entry {key!r} in {path}; run with LORATUNE_UPDATE_GOLDEN=1"
    assert ids == table[key]["ids"]
    assert labels == table[key]["labels"]


def test_every_builtin_template_has_a_golden() -> None:
    assert set(TEMPLATES) == set(EXPECTED)


@pytest.mark.parametrize("name", list(EXPECTED))
def test_builtin_template_golden(name: str, toks: dict) -> None:
    family, text, runs = EXPECTED[name]
    tok, info = toks[family]
    ids, labels = render_conversation(CONV, TEMPLATES[name], tok, info)
    assert tok.decode(ids) == text  # exact rendering, BOS included once
    assert supervised_runs(tok, ids, labels) == runs  # both assistant turns, each with its end-of-turn token
    stop = tok(TEMPLATES[name].stop_text(tok.eos_token), add_special_tokens=False).input_ids
    if len(stop) == 1:  # a single end-of-turn token: it is supervised once per assistant turn
        assert labels.count(stop[0]) == 2
    if info.bos_id is not None:
        assert ids[0] == info.bos_id and ids.count(info.bos_id) == 1
    assert labels[0] == IGNORE
    check_golden("templates", name, ids, labels)


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral", "gemma"])
def test_tiny_family_golden(family: str, toks: dict) -> None:
    """Each tiny model's own template (data.template: auto) is found and renders exactly."""
    tok, info = toks[family]
    template = resolve_template("auto", tok)
    name = {"llama": "llama3", "qwen2": "chatml", "mistral": "mistral", "gemma": "gemma"}[family]
    assert template == TEMPLATES[name]
    ids, labels = render_conversation(CONV, template, tok, info)
    _, text, runs = EXPECTED[name]
    assert tok.decode(ids) == text
    assert supervised_runs(tok, ids, labels) == runs
    assert labels.count(info.eos_id) >= (2 if template.stop_text(tok.eos_token) == tok.eos_token else 0)
    n_bos = ids.count(info.bos_id) if info.bos_id is not None else 0
    assert n_bos == (0 if family == "qwen2" else 1)
    check_golden("families", family, ids, labels)


def test_default_system_prompts(toks: dict) -> None:
    tok, _ = toks["mistral"]
    from loratune.data.templates import render_text

    conv = CONV[1:3]
    assert render_text(tok, TEMPLATES["alpaca"].jinja, conv).startswith("Below is an instruction that describes a task.")
    assert render_text(tok, TEMPLATES["vicuna"].jinja, conv).startswith(
        "A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
        "detailed, and polite answers to the user's questions. USER: ")


@pytest.mark.parametrize("train_on,expected", [("last", ["Rome.<|im_end|>"]), ("all", None)])
def test_train_on(train_on: str, expected, toks: dict) -> None:
    tok, info = toks["qwen2"]
    ids, labels = render_conversation(CONV, TEMPLATES["chatml"], tok, info, train_on=train_on)
    if expected is None:  # everything but the first token (nothing predicts it)
        assert labels[0] == IGNORE and labels[1:] == ids[1:]
    else:
        assert supervised_runs(tok, ids, labels) == expected


def test_generation_prompt_matches_training(toks: dict) -> None:
    """encode_prompt (serving) gives exactly the training ids up to the first supervised token."""
    from loratune.data.render import encode_prompt

    for family in ("llama", "qwen2", "mistral", "gemma"):
        tok, info = toks[family]
        template = resolve_template("auto", tok)
        ids, labels = render_conversation(CONV[:3], template, tok, info)
        prompt = encode_prompt(CONV[:2], template, tok, info)
        first = next(i for i, label in enumerate(labels) if label != IGNORE)
        assert prompt == ids[:first], family


TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
CALL = '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>'
TOOL_CONV = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "content": "", "tool_calls": [{"type": "function", "function": {"name": "get_weather",
                                                                                        "arguments": {"city": "Paris"}}}]},
    {"role": "tool", "content": "sunny"},
    {"role": "system", "content": "Answer in two words."},
    {"role": "assistant", "content": "Sunny, warm."},
]


@pytest.mark.parametrize("name", list(EXPECTED))
def test_builtin_template_tools_golden(name: str, toks: dict) -> None:
    """Every built-in template renders the tool schemas, the calls and the tool's output, and drops no message;
    the call is supervised like a reply, with its end-of-turn token; serving's prompt is training's prefix."""
    from loratune.data.render import encode_prompt

    family = EXPECTED[name][0]
    tok, info = toks[family]
    template = TEMPLATES[name]
    ids, labels = render_conversation(TOOL_CONV, template, tok, info, tools=TOOLS)
    text = tok.decode(ids)
    stop = template.stop_text(tok.eos_token)
    space = " " if name in ("vicuna", "guanaco") else ""
    assert supervised_runs(tok, ids, labels) == [f"{space}{CALL}{stop}", f"{space}Sunny, warm.{stop}"]
    for piece in ("You are terse.", "Weather in Paris?", "sunny", "Answer in two words.",
                  '<tools>\n{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}\n</tools>'):
        assert text.count(piece) == 1, piece
    if info.bos_id is not None:
        assert ids[0] == info.bos_id and ids.count(info.bos_id) == 1
    first = next(i for i, label in enumerate(labels) if label != IGNORE)
    assert encode_prompt(TOOL_CONV[:2], template, tok, info, tools=TOOLS) == ids[:first]
    check_golden("tools", name, ids, labels)


@pytest.mark.parametrize("name", ["mistral", "gemma"])
def test_folded_system_before_an_assistant_opening(name: str, toks: dict) -> None:
    """Templates without a system role give the system text a user turn of its own when the conversation opens
    with the assistant, instead of dropping it or training on it as part of the reply."""
    tok, info = toks[EXPECTED[name][0]]
    conv = [{"role": "system", "content": "Be kind."}, {"role": "assistant", "content": "Hello!"},
            {"role": "user", "content": "Hi."}, {"role": "assistant", "content": "How can I help?"}]
    ids, labels = render_conversation(conv, TEMPLATES[name], tok, info)
    stop = TEMPLATES[name].stop_text(tok.eos_token)
    assert supervised_runs(tok, ids, labels) == [f"Hello!{stop}", f"How can I help?{stop}"]
    expected = {"mistral": "<s>[INST] Be kind. [/INST]Hello!</s>[INST] Hi. [/INST]How can I help?</s>",
                "gemma": "<bos><start_of_turn>user\nBe kind.<end_of_turn>\n<start_of_turn>model\nHello!<end_of_turn>\n"
                         "<start_of_turn>user\nHi.<end_of_turn>\n<start_of_turn>model\nHow can I help?<end_of_turn>\n"}
    assert tok.decode(ids) == expected[name]
