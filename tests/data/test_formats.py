"""Every format (auto-detected and explicit), column mapping, and every file type, read end to end."""

from __future__ import annotations

import json

import pytest

from datahelp import data_cfg
from loratune.data.pipeline import prepare_data
from loratune.data.render import IGNORE

PAIR = ("What is two plus two?", "Four.")

RECORDS = {
    "messages": {"messages": [{"role": "system", "content": "Be exact."}, {"role": "user", "content": PAIR[0]},
                              {"role": "assistant", "content": PAIR[1]}]},
    "sharegpt": {"conversations": [{"from": "human", "value": PAIR[0]}, {"from": "gpt", "value": PAIR[1]}],
                 "system": "Be exact."},
    "alpaca": {"instruction": "What is", "input": "two plus two?", "output": PAIR[1], "system": "Be exact."},
    "input_output": {"input": PAIR[0], "output": PAIR[1]},
    "prompt_completion": {"prompt": PAIR[0], "completion": PAIR[1]},
    "oasst": {"text": f"### Human: {PAIR[0]}### Assistant: {PAIR[1]}### Human: Sure?### Assistant: Yes."},
    "text": {"text": "Plain text for continued pretraining."},
}


def supervised_text(tok, sample) -> str:
    return tok.decode([i for i, label in zip(sample.input_ids, sample.labels) if label != IGNORE])


@pytest.mark.parametrize("explicit", [False, True])
@pytest.mark.parametrize("fmt", list(RECORDS))
def test_each_format(fmt: str, explicit: bool, write, toks: dict) -> None:
    tok, info = toks["qwen2"]
    path = write(f"{fmt}.jsonl", [RECORDS[fmt]] * 3)
    data = prepare_data(data_cfg({"path": str(path), "format": fmt if explicit else "auto"}), tok, info, seed=0)
    assert len(data.train) == 3
    assert data.stats.datasets[0].format == fmt
    got = supervised_text(tok, data.train[0])
    if fmt == "text":
        text = tok.decode(data.train[0].input_ids)
        assert text == "Plain text for continued pretraining.<|im_end|>"  # eos closes the document
        assert got == text[len(tok.decode(data.train[0].input_ids[:1])):]  # loss on every token but the first
    elif fmt == "oasst":
        assert got == "Four.<|im_end|>Yes.<|im_end|>"
    else:
        assert got == "Four.<|im_end|>"
    if fmt in ("messages", "sharegpt", "alpaca"):
        assert "<|im_start|>system\nBe exact.<|im_end|>" in tok.decode(data.train[0].input_ids)
    if fmt == "alpaca":
        assert "What is\n\ntwo plus two?" in tok.decode(data.train[0].input_ids)


def test_alpaca_history_and_columns(write, toks: dict) -> None:
    tok, info = toks["qwen2"]
    path = write("a.jsonl", [{"q": "Second?", "a": "Two.", "past": [["First?", "One."]]}])
    from loratune.config import ColumnsConfig

    cfg = data_cfg(path)
    cfg.datasets[0].columns = ColumnsConfig(instruction="q", output="a", history="past")
    data = prepare_data(cfg, tok, info, seed=0)
    assert supervised_text(tok, data.train[0]) == "One.<|im_end|>Two.<|im_end|>"


def test_column_mapping_for_messages(write, toks: dict) -> None:
    from loratune.config import ColumnsConfig

    tok, info = toks["qwen2"]
    path = write("m.jsonl", [{"dialog": [{"speaker": "user", "text": "Hi?"}, {"speaker": "bot", "text": "Hello."}]}])
    cfg = data_cfg(path)
    cfg.datasets[0].columns = ColumnsConfig(messages="dialog", role="speaker", content="text")
    data = prepare_data(cfg, tok, info, seed=0)
    assert supervised_text(tok, data.train[0]) == "Hello.<|im_end|>"


def test_columns_from_yaml(tmp_path, write) -> None:
    """The config loader builds ColumnsConfig from a YAML mapping and rejects unknown column names."""
    from loratune.config import load_config
    from loratune.errors import ConfigError

    cfg = tmp_path / "c.yaml"
    cfg.write_text("model: {path: x}\ndata:\n  datasets:\n    - path: d.jsonl\n      columns: {instruction: q, output: a}\n")
    assert load_config(cfg).data.datasets[0].columns.instruction == "q"
    cfg.write_text("model: {path: x}\ndata:\n  datasets:\n    - path: d.jsonl\n      columns: {instrucion: q}\n")
    with pytest.raises(ConfigError, match="instrucion"):
        load_config(cfg)


def test_openai_extras(write, toks: dict) -> None:
    """Content parts are joined; tool messages and tool_calls pass through; a default system is added."""
    tok, info = toks["qwen2"]
    rec = {"messages": [{"role": "user", "content": [{"type": "text", "text": "Weather"}, {"type": "text", "text": "?"}]},
                        {"role": "assistant", "content": None, "tool_calls": [{"function": {"name": "w"}}]},
                        {"role": "tool", "content": "sunny"}, {"role": "assistant", "content": "Sunny."}]}
    cfg = data_cfg({"path": str(write("t.jsonl", [rec])), "system": "Default system."})
    data = prepare_data(cfg, tok, info, seed=0)
    text = tok.decode(data.train[0].input_ids)
    assert text.startswith("<|im_start|>system\nDefault system.<|im_end|>\n<|im_start|>user\nWeather?<|im_end|>")
    assert "<|im_start|>tool\nsunny<|im_end|>" in text
    assert supervised_text(tok, data.train[0]).endswith("Sunny.<|im_end|>")


# --------------------------------------------------------------------------------------------- file types

ROWS = [{"instruction": f"Say {i}", "output": f"{i}."} for i in range(4)]


def _csv(rows: list[dict], sep: str) -> str:
    return sep.join(rows[0]) + "\n" + "".join(sep.join(r.values()) + "\n" for r in rows)


@pytest.mark.parametrize("suffix", [".json", ".jsonl", ".csv", ".tsv", ".parquet"])
def test_file_types(suffix: str, tmp_path, write, toks: dict) -> None:
    tok, info = toks["qwen2"]
    if suffix == ".json":
        path = write("d.json", json.dumps(ROWS))
    elif suffix == ".jsonl":
        path = write("d.jsonl", ROWS)
    elif suffix in (".csv", ".tsv"):
        path = write(f"d{suffix}", _csv(ROWS, "," if suffix == ".csv" else "\t"))
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        path = tmp_path / "d.parquet"
        pq.write_table(pa.Table.from_pylist(ROWS), path)
    data = prepare_data(data_cfg(path), tok, info, seed=0)
    assert data.stats.datasets[0].records == 4
    assert sorted(supervised_text(tok, s) for s in data.train) == [f"{i}.<|im_end|>" for i in range(4)]


def test_csv_with_json_messages_column(write, toks: dict) -> None:
    tok, info = toks["qwen2"]
    msgs = json.dumps([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo, there."}])
    path = write("m.csv", 'messages\n"' + msgs.replace('"', '""') + '"\n')
    data = prepare_data(data_cfg(path), tok, info, seed=0)
    assert supervised_text(tok, data.train[0]) == "Yo, there.<|im_end|>"


def test_txt_and_folder(tmp_path, write, toks: dict) -> None:
    tok, info = toks["qwen2"]
    write("corpus/a.txt", "First document,\nstill the first.\n\nSecond document.\n")
    write("corpus/sub/b.jsonl", [{"text": "Third document."}])
    write("corpus/.hidden/c.jsonl", "not even json")
    write("corpus/notes.md", "ignored")
    data = prepare_data(data_cfg(tmp_path / "corpus"), tok, info, seed=0)
    texts = sorted(tok.decode(s.input_ids) for s in data.train)
    assert texts == ["First document,\nstill the first.<|im_end|>", "Second document.<|im_end|>",
                     "Third document.<|im_end|>"]


def test_long_text_is_split_not_truncated(write, toks: dict) -> None:
    """Continued pretraining: a long document becomes max_length chunks, each token a target once."""
    tok, info = toks["qwen2"]
    doc = " ".join(f"word{i}" for i in range(300))
    data = prepare_data(data_cfg(write("long.txt", doc), max_length=64), tok, info, seed=0)
    full = tok(doc + tok.eos_token, add_special_tokens=False).input_ids
    assert len(data.train) > 1 and all(len(s) <= 64 for s in data.train)
    assert data.stats.outcomes["split"] == 1 and data.stats.truncated == 0
    assert sum(sum(1 for x in s.labels if x != IGNORE) for s in data.train) == len(full) - 1


# ------------------------------------------------------------------------------------------ tools

TOOL = {"name": "get_weather", "description": "Weather of a city", "parameters": {"type": "object"}}
CALL = '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>'


def test_sharegpt_function_call_observation_and_tools(write, toks: dict) -> None:
    """LLaMA-Factory's sharegpt tool form: tools as a JSON string, a function_call turn holding the call as JSON."""
    tok, info = toks["qwen2"]
    rec = {"conversations": [{"from": "human", "value": "Weather in Paris?"},
                             {"from": "function_call", "value": '{"name": "get_weather", "arguments": {"city": "Paris"}}'},
                             {"from": "observation", "value": "sunny, 21C"},
                             {"from": "gpt", "value": "Sunny and 21C."}],
           "tools": json.dumps([TOOL])}
    data = prepare_data(data_cfg({"path": str(write("s.jsonl", [rec])), "format": "sharegpt"}, template="chatml"),
                        tok, info, seed=0)
    text = tok.decode(data.train[0].input_ids)
    assert text.startswith("<|im_start|>system\nYou can call these functions.")
    assert '<tools>\n{"type": "function", "function": {"name": "get_weather", "description": "Weather of a city", ' \
           '"parameters": {"type": "object"}}}\n</tools><|im_end|>\n' in text
    assert text.endswith(f"<|im_start|>user\nWeather in Paris?<|im_end|>\n<|im_start|>assistant\n{CALL}<|im_end|>\n"
                         "<|im_start|>tool\nsunny, 21C<|im_end|>\n<|im_start|>assistant\nSunny and 21C.<|im_end|>\n")
    # the call is trained on like any reply, its end-of-turn token included; the tool's output is not
    assert supervised_text(tok, data.train[0]) == f"{CALL}<|im_end|>Sunny and 21C.<|im_end|>"


def test_openai_tool_calls_with_string_arguments(write, toks: dict) -> None:
    """OpenAI gives arguments as a JSON string: parsed, so every template sees one shape."""
    tok, info = toks["llama"]
    rec = {"messages": [{"role": "user", "content": "Weather in Paris?"},
                        {"role": "assistant", "content": "Let me look.", "tool_calls": [
                            {"id": "c1", "type": "function",
                             "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
                        {"role": "tool", "tool_call_id": "c1", "content": "sunny"},
                        {"role": "assistant", "content": "Sunny."}],
           "tools": [{"type": "function", "function": TOOL}]}
    data = prepare_data(data_cfg(write("t.jsonl", [rec]), template="llama3"), tok, info, seed=0)
    assert supervised_text(tok, data.train[0]) == f"Let me look.\n{CALL}<|eot_id|>Sunny.<|eot_id|>"
    assert "<|start_header_id|>tool<|end_header_id|>\n\nsunny<|eot_id|>" in tok.decode(data.train[0].input_ids)


def test_normalised_tool_shapes(write) -> None:
    from loratune.data.formats import Normaliser
    from loratune.data.readers import Record

    norm = Normaliser("auto", None, None)
    ex = norm(Record("f", 1, {"conversations": [{"from": "human", "value": "q"},
                                                {"from": "function_call", "value": '[{"name": "a"}, {"name": "b", "arguments": "{\\"x\\": 1}"}]'}],
                              "tools": [TOOL]}))
    assert ex.messages[1] == {"role": "assistant", "content": "", "tool_calls": [
        {"type": "function", "function": {"name": "a", "arguments": {}}},
        {"type": "function", "function": {"name": "b", "arguments": {"x": 1}}}]}
    assert ex.tools == [{"type": "function", "function": TOOL}]


def test_sharegpt_detected_by_list_key(write) -> None:
    """A conversations list whose turns lack both from and role is reported as sharegpt (from/value)."""
    from loratune.data.formats import Normaliser
    from loratune.data.readers import Record
    from loratune.errors import DataError

    with pytest.raises(DataError, match=r"key 'conversations\[0\]': missing key 'from'; expected \{from, value\}"):
        Normaliser("auto", None, None)(Record("f", 1, {"conversations": [{"value": "x"}]}))


@pytest.mark.parametrize("key", ["reasoning_content", "reasoning", "thinking"])
def test_reasoning_is_kept_as_reasoning_content(key: str) -> None:
    from loratune.data.formats import Normaliser
    from loratune.data.readers import Record
    from loratune.errors import DataError

    norm = Normaliser("auto", None, None)
    ex = norm(Record("f", 1, {"messages": [{"role": "user", "content": "q"},
                                           {"role": "assistant", "content": "a", key: "because"}]}))
    assert ex.messages[1] == {"role": "assistant", "content": "a", "reasoning_content": "because"}
    with pytest.raises(DataError, match=rf"f: row 1: key 'messages\[0\]\.{key}': reasoning belongs to assistant "
                                        "messages, not to a user message"):
        norm(Record("f", 1, {"messages": [{"role": "user", "content": "q", key: "x"}]}))
    with pytest.raises(DataError, match=rf"key 'messages\[1\]\.{key}': expected a string, got an integer"):
        norm(Record("f", 1, {"messages": [{"role": "user", "content": "q"},
                                          {"role": "assistant", "content": "a", key: 3}]}))
