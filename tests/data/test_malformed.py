"""One test per malformed input: each raises DataError with one line naming file, row, key and expectation,
and the CLI turns it into a non-zero exit with that line and no traceback."""

from __future__ import annotations

import json
import re
import sys

import pytest

from datahelp import data_cfg
from loratune.config import DatasetConfig
from loratune.data.pipeline import prepare_data
from loratune.errors import ConfigError, DataError

OK = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]}


def fails(cfg, toks, family: str = "qwen2") -> str:
    tok, info = toks[family]
    with pytest.raises(DataError) as e:
        prepare_data(cfg, tok, info, seed=0)
    msg = str(e.value)
    assert "\n" not in msg
    return msg


def row(path, n: int) -> str:
    return re.escape(f"{path}: row {n}: ")


def test_missing_key(write, toks) -> None:
    p = write("a.jsonl", [{"instruction": "Do it", "output": "Done."}, {"instruction": "Do it"}])
    assert re.match(row(p, 2) + r"missing key 'output'; expected instruction and output \(alpaca format.*"
                    r"the record has keys: instruction$", fails(data_cfg(p), toks))


def test_wrong_keys(write, toks) -> None:
    p = write("a.jsonl", [{"question": "Q", "answer": "A"}])
    assert re.match(row(p, 1) + "cannot tell the format from keys question, answer; expected messages", fails(data_cfg(p), toks))


def test_wrong_keys_explicit_format(write, toks) -> None:
    p = write("a.jsonl", [{"question": "Q", "answer": "A"}])
    msg = fails(data_cfg({"path": str(p), "format": "prompt_completion"}), toks)
    assert msg.startswith(f"{p}: row 1: missing key 'prompt'; expected prompt and completion (prompt_completion format)")


def test_mapped_column_missing(write, toks) -> None:
    from loratune.config import ColumnsConfig

    p = write("a.jsonl", [{"instruction": "Q", "output": "A"}])
    cfg = data_cfg({"path": str(p), "format": "alpaca"})
    cfg.datasets[0].columns = ColumnsConfig(output="answer")
    assert "missing key 'answer' (set by columns.output)" in fails(cfg, toks)


def test_messages_not_a_list(write, toks) -> None:
    p = write("m.jsonl", [OK, {"messages": "Hi there"}])
    assert fails(data_cfg(p), toks) == f"{p}: row 2: key 'messages': expected a list of {{role, content}}, got a string"


def test_unknown_role(write, toks) -> None:
    p = write("m.jsonl", [{"messages": [{"role": "user", "content": "Hi"}, {"role": "robot", "content": "Beep."}]}])
    assert fails(data_cfg(p), toks) == (f"{p}: row 1: key 'messages[1].role': unknown role \"robot\"; expected one of "
                                        "system, user, assistant, tool (or human, gpt, function_call, observation)")


def test_sharegpt_unknown_role(write, toks) -> None:
    p = write("s.jsonl", [{"conversations": [{"from": "human", "value": "Hi"}, {"from": "narrator", "value": "x"}]}])
    assert fails(data_cfg(p), toks).startswith(f"{p}: row 1: key 'conversations[1].from': unknown role \"narrator\"")


def test_empty_turn(write, toks) -> None:
    p = write("m.jsonl", [{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "  "}]}])
    assert fails(data_cfg(p), toks) == f"{p}: row 1: key 'messages[1].content': empty assistant turn; expected non-empty text"


def test_empty_alpaca_output(write, toks) -> None:
    p = write("a.jsonl", [{"instruction": "Q", "output": ""}])
    assert fails(data_cfg(p), toks) == f"{p}: row 1: key 'output': empty text; expected non-empty text"


def test_non_string_content(write, toks) -> None:
    p = write("m.jsonl", [{"messages": [{"role": "user", "content": 42}, {"role": "assistant", "content": "A"}]}])
    assert fails(data_cfg(p), toks) == (f"{p}: row 1: key 'messages[0].content': expected a string (or a list of "
                                        "{type: text, text} parts), got an integer")


def test_message_not_an_object(write, toks) -> None:
    p = write("m.jsonl", [{"messages": ["Hi", "Hello"]}])
    assert fails(data_cfg(p), toks) == f"{p}: row 1: key 'messages[0]': expected {{role, content}}, got a string"


def test_message_missing_content(write, toks) -> None:
    p = write("m.jsonl", [{"messages": [{"role": "user"}]}])
    assert fails(data_cfg(p), toks) == f"{p}: row 1: key 'messages[0]': missing key 'content'; expected {{role, content}}, got keys role"


def test_row_not_an_object(write, toks) -> None:
    p = write("m.jsonl", [OK, ["Hi", "Hello"]])
    assert fails(data_cfg(p), toks) == f"{p}: row 2: expected a record (a JSON object / mapping of keys), got a list"


def test_bad_utf8_jsonl(write, toks) -> None:
    p = write("m.jsonl", (json.dumps(OK) + "\n").encode() + b'{"text": "caf\xe9"}\n')
    assert fails(data_cfg(p), toks) == f"{p}: row 2: not valid UTF-8 (byte 0xe9 at column 14); expected UTF-8 text"


def test_bad_utf8_csv(write, toks) -> None:
    p = write("m.csv", b"instruction,output\nQ,A\nQ2,caf\xe9\n")
    assert fails(data_cfg(p), toks) == f"{p}: row 3: not valid UTF-8 (byte 0xe9 at column 7); expected UTF-8 text"


def test_bad_utf8_json(write, toks) -> None:
    p = write("m.json", b'[\n{"text": "ok"},\n{"text": "caf\xe9"}\n]')
    assert fails(data_cfg(p), toks).startswith(f"{p}: row 3: not valid UTF-8 (byte 0xe9 at line 3, column 14)")


def test_invalid_json_line(write, toks) -> None:
    p = write("m.jsonl", json.dumps(OK) + '\n{"messages": [}\n')
    assert fails(data_cfg(p), toks).startswith(f"{p}: row 2: not valid JSON (Expecting value at column 15)")


def test_mixed_formats(write, toks) -> None:
    p = write("m.jsonl", [OK, OK, {"instruction": "Q", "output": "A"}])
    assert fails(data_cfg(p), toks) == (f"{p}: row 3: mixed formats: row 1 is messages but this row is alpaca; "
                                        "one file must hold one format")


def test_empty_file(write, toks) -> None:
    p = write("e.jsonl", "")
    assert fails(data_cfg(p), toks) == f"{p}: the file is empty; expected at least one record"


def test_blank_file(write, toks) -> None:
    p = write("e.jsonl", "\n\n  \n")
    assert "holds no records" in fails(data_cfg(p), toks)


def test_missing_file(tmp_path, toks) -> None:
    p = tmp_path / "nope.jsonl"
    assert fails(data_cfg(p), toks) == f"{p}: no such file or folder"


def test_empty_folder(tmp_path, toks) -> None:
    (tmp_path / "empty").mkdir()
    assert "the folder holds no dataset files" in fails(data_cfg(tmp_path / "empty"), toks)


def test_unsupported_suffix(write, toks) -> None:
    p = write("d.xml", "<a/>")
    assert fails(data_cfg(p), toks).startswith(f"{p}: unsupported file type '.xml'")


def test_csv_column_count(write, toks) -> None:
    p = write("d.csv", "instruction,output\nQ,A\nQ,A,extra\n")
    assert fails(data_cfg(p), toks) == f"{p}: row 3: 3 columns, expected 2 as in the header (instruction, output)"


def test_hub_name_offline(toks, monkeypatch) -> None:
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    msg = fails(data_cfg("someone/some-dataset"), toks)
    assert msg.startswith("someone/some-dataset: no such file or folder, and the hub is offline")


def test_hub_name_without_the_datasets_package(toks, monkeypatch) -> None:
    for var in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setitem(sys.modules, "datasets", None)  # `import datasets` raises ImportError, as when not installed
    assert fails(data_cfg("someone/some-dataset"), toks) == (
        "someone/some-dataset: no such file or folder; loading it as a hub dataset needs the `datasets` package: "
        "pip install 'loratune[data]'")


def test_no_datasets(toks) -> None:
    assert "data.datasets is empty" in fails(data_cfg(), toks)


NO_REPLY = {"messages": [{"role": "user", "content": "Hi, nobody answers."}]}
EXAMPLE = 'e.g. {"messages": [{"role": "user", ...}, {"role": "assistant", ...}]}'


def test_no_record_has_an_assistant_turn(write, toks) -> None:
    p = write("u.jsonl", [NO_REPLY] * 3)
    assert fails(data_cfg(p), toks) == (f"{p}: none of its 3 records has a token to train on: 3 have no assistant turn "
                                        f"to learn from (data.train_on=assistant); expected conversations with an "
                                        f"assistant reply, {EXAMPLE}")


def test_the_dataset_without_replies_is_named_among_good_ones(write, toks) -> None:
    good, bad = write("good.jsonl", [OK] * 4), write("bad.jsonl", [NO_REPLY] * 2)
    assert fails(data_cfg(good, bad), toks).startswith(f"{bad}: none of its 2 records has a token to train on: "
                                                       "2 have no assistant turn")
    with pytest.raises(DataError, match=re.escape(f"{bad}: none of its 2 records")):  # an eval dataset too
        prepare_data(data_cfg(good, eval_datasets=[DatasetConfig(path=str(bad))]), *toks["qwen2"], seed=0)


def test_every_reply_cut_by_the_length_limit(write, toks) -> None:
    long_prompt = {"messages": [{"role": "user", "content": "Why? " * 60}, {"role": "assistant", "content": "So."}]}
    p = write("long.jsonl", [long_prompt, NO_REPLY])
    assert fails(data_cfg(p, max_length=32, truncation="end"), toks) == (
        f"{p}: none of its 2 records has a token to train on: 1 have no assistant turn to learn from "
        f"(data.train_on=assistant), 1 lost theirs to data.max_length=32; expected conversations with an assistant "
        f"reply, {EXAMPLE}")


def test_everything_dropped_names_each_dataset(write, toks) -> None:
    long = {"messages": [{"role": "user", "content": "Why? " * 60}, {"role": "assistant", "content": "So."}]}
    a, b = write("a.jsonl", [long] * 2), write("b.jsonl", [long, NO_REPLY])
    assert fails(data_cfg(a, b, max_length=32, truncation="drop"), toks) == (
        f"no training samples left after length limits and drops ({a}: 2 records, dropped: 2 too long; "
        f"{b}: 2 records, dropped: 1 too long, 1 no supervised)")


def test_template_rejects_conversation(write, toks) -> None:
    p = write("t.jinja", "{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('no system role') }}"
                         "{% endif %}{{ m['content'] }}{{ eos_token }}{% endfor %}")
    d = write("m.jsonl", [OK, {"messages": [{"role": "system", "content": "S"}, *OK["messages"]]}])
    assert fails(data_cfg(d, template=str(p)), toks) == f"{d}: row 2: chat template 't' rejected the conversation: no system role"


def test_template_not_prefix_stable_is_labelled_from_one_rendering(write, toks) -> None:
    # marks the last message: an earlier turn renders differently once a turn is added, which the renderer must
    # label from the whole rendering (no prefix property asked for)
    p = write("t.jinja", "{% for m in messages %}{% if loop.last %}(last) {% endif %}<|im_start|>{{ m['role'] }}\n"
                         "{{ m['content'] }}<|im_end|>\n{% endfor %}")
    conv = {"messages": [{"role": "user", "content": "A?"}, {"role": "assistant", "content": "A."},
                         {"role": "user", "content": "B?"}, {"role": "assistant", "content": "B."}]}
    d = write("m.jsonl", [conv])
    tok, info = toks["qwen2"]
    data = prepare_data(data_cfg(d, template=str(p)), tok, info, seed=0)
    (sample,) = data.train
    assert tok.decode(sample.input_ids) == ("<|im_start|>user\nA?<|im_end|>\n<|im_start|>assistant\nA.<|im_end|>\n"
                                            "<|im_start|>user\nB?<|im_end|>\n(last) <|im_start|>assistant\nB.<|im_end|>\n")
    supervised = [t for t, label in zip(sample.input_ids, sample.labels) if label != -100]
    assert tok.decode(supervised) == "A.<|im_end|>B.<|im_end|>"


def test_template_without_end_of_turn(write, toks) -> None:
    p = write("t.jinja", "{% for m in messages %}{{ m['content'] }}{% endfor %}")
    tok, info = toks["qwen2"]
    with pytest.raises(ConfigError, match="writes nothing after an assistant message"):
        prepare_data(data_cfg(write("m.jsonl", [OK]), template=str(p)), tok, info, seed=0)


def test_unknown_template_name(write, toks) -> None:
    tok, info = toks["qwen2"]
    with pytest.raises(ConfigError, match="expected 'auto', one of llama3, chatml"):
        prepare_data(data_cfg(write("m.jsonl", [OK]), template="chatmll"), tok, info, seed=0)
    with pytest.raises(ConfigError, match=r"^config key 'data.template': got 'llama-3'; did you mean 'llama3'\? "):
        prepare_data(data_cfg(write("m.jsonl", [OK]), template="llama-3"), tok, info, seed=0)


def test_double_bos(write, toks) -> None:
    p = write("m.jsonl", [{"messages": [{"role": "user", "content": "<|begin_of_text|>Hi"}, {"role": "assistant", "content": "A"}]}])
    assert fails(data_cfg(p), toks, "llama") == (f"{p}: row 1: the sequence holds 2 BOS tokens ('<|begin_of_text|>'); "
                                                 "expected exactly one: does a message contain the BOS text?")


def test_cli_prints_one_line(tmp_path, write, tiny_llama, capsys) -> None:
    from loratune.cli import main

    d = write("m.jsonl", [OK, {"messages": [{"role": "user", "content": 3}]}])
    cfg = write("c.yaml", f"model: {{path: {tiny_llama}}}\ndata:\n  datasets:\n    - path: {d}\n")
    assert main(["data", "preview", str(cfg)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"error: {d}: row 2: key 'messages[0].content': expected a string (or a list of "
                   "{type: text, text} parts), got an integer")
    assert "Traceback" not in err


def test_tool_calls_not_a_list(write, toks) -> None:
    p = write("m.jsonl", [{"messages": [{"role": "user", "content": "Q"},
                                        {"role": "assistant", "content": None, "tool_calls": "get_weather"}]}])
    assert fails(data_cfg(p), toks) == (f"{p}: row 1: key 'messages[1].tool_calls': not valid JSON (Expecting value at "
                                        'column 1); expected a list of {"function": {"name": ..., "arguments": ...}}')


def test_tool_call_without_name(write, toks) -> None:
    p = write("m.jsonl", [{"messages": [{"role": "user", "content": "Q"},
                                        {"role": "assistant", "content": "", "tool_calls": [{"function": {"arguments": {}}}]}]}])
    assert fails(data_cfg(p), toks) == (f"{p}: row 1: key 'messages[1].tool_calls[0]': expected a call with a non-empty "
                                        'string "name", got {"function": {"arguments": {}}}')


def test_tool_call_arguments_not_an_object(write, toks) -> None:
    p = write("m.jsonl", [{"messages": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "", "tool_calls": [
        {"function": {"name": "f", "arguments": "[1, 2]"}}]}]}])
    assert fails(data_cfg(p), toks) == (f"{p}: row 1: key 'messages[1].tool_calls[0].arguments': expected a JSON object "
                                        "of arguments, got a list")


def test_function_call_not_json(write, toks) -> None:
    p = write("s.jsonl", [{"conversations": [{"from": "human", "value": "Q"}, {"from": "function_call", "value": "get it"}]}])
    assert fails(data_cfg(p), toks) == (f"{p}: row 1: key 'conversations[1].value': not valid JSON (Expecting value at "
                                        'column 1); expected a JSON object {"name": ..., "arguments": {...}} (or a list of them)')


def test_tool_schema_without_name(write, toks) -> None:
    p = write("m.jsonl", [{**OK, "tools": [{"description": "nameless"}]}])
    assert fails(data_cfg(p), toks) == (f"{p}: row 1: key 'tools[0]': expected a tool schema with a non-empty string "
                                        '"name", got {"description": "nameless"}')


def test_sharegpt_missing_from(write, toks) -> None:
    p = write("s.jsonl", [{"conversations": [{"value": "Hi"}, {"from": "gpt", "value": "Hello."}]}])
    assert fails(data_cfg(p), toks) == (f"{p}: row 1: key 'conversations[0]': missing key 'from'; expected "
                                        "{from, value}, got keys value")


def test_template_drops_a_message(write, toks) -> None:
    """A template without a tool role must not silently train on a conversation the model never sees."""
    p = write("t.jinja", "{% for m in messages %}{% if m['role'] in ('user', 'assistant') %}<|im_start|>{{ m['role'] }}\n"
                         "{{ m['content'] }}<|im_end|>\n{% endif %}{% endfor %}"
                         "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    d = write("m.jsonl", [{"messages": [*OK["messages"], {"role": "tool", "content": "result 42"},
                                        {"role": "assistant", "content": "Done."}]}])
    assert fails(data_cfg(d, template=str(p)), toks) == (f"{d}: row 1: chat template 't' leaves out message 2 (tool): its "
                                                         "text is not in the rendering; use a template that renders tool messages")


def test_template_ignores_tools(write, toks) -> None:
    p = write("t.jinja", "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                         "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    d = write("m.jsonl", [{**OK, "tools": [{"name": "lookup"}]}])
    assert fails(data_cfg(d, template=str(p)), toks) == (f"{d}: row 1: chat template 't' leaves out the record's tools; use "
                                                         "a template that renders tools (every built-in one does)")
