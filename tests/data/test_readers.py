"""The streaming .json array reader: same records and same error positions as reading the file whole,
whatever the block size, and records come out before the rest of the file is read."""

from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from loratune.data import readers
from loratune.errors import DataError

SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
                      lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
                      max_leaves=8)


@SETTINGS
@given(records=st.lists(st.dictionaries(st.text(max_size=6), values, max_size=4), max_size=6),
       block=st.integers(1, 40), indent=st.sampled_from([None, 1, 2]), bom=st.booleans())
def test_array_streamed_in_blocks(tmp_path, monkeypatch, records: list, block: int, indent, bom: bool) -> None:
    monkeypatch.setattr(readers, "BLOCK", block)
    path = tmp_path / "d.json"
    path.write_bytes((b"\xef\xbb\xbf" if bom else b"") + json.dumps(records, indent=indent, ensure_ascii=False).encode())
    got = [(r.row, r.data) for r in readers._json_array(path)]
    assert got == list(enumerate(records, 1))


@pytest.mark.parametrize("text", ['[{"a": 1},]', '[{"a": 1} {"b": 2}]', '[{"a": 1},\n {"b": tru}]', '[{"a": 1}',
                                  '[\n  {"a": "x"},\n  {"b": 1e}\n]', '[{"a": 1}] extra'])
@pytest.mark.parametrize("block", [3, 1 << 20])
def test_array_errors_located_like_json(tmp_path, monkeypatch, text: str, block: int) -> None:
    """The line and column match what json.loads reports for the whole file (messages name our expectation)."""
    monkeypatch.setattr(readers, "BLOCK", block)
    path = tmp_path / "d.json"
    path.write_text(text)
    with pytest.raises(json.JSONDecodeError) as ref:
        json.loads(text)
    with pytest.raises(DataError) as e:
        list(readers._json_array(path))
    msg = str(e.value)
    assert msg.startswith(f"{path}: not valid JSON (") and msg.endswith("); expected a JSON array of records")
    assert f"at line {ref.value.lineno}, column {ref.value.colno})" in msg


@pytest.mark.parametrize("block", [1, 5, 1 << 20])
def test_array_bad_utf8_across_blocks(tmp_path, monkeypatch, block: int) -> None:
    monkeypatch.setattr(readers, "BLOCK", block)
    path = tmp_path / "d.json"
    path.write_bytes('[\n{"text": "é"},\n{"text": "caf'.encode() + b'\xe9"}\n]')
    with pytest.raises(DataError) as e:
        list(readers._json_array(path))
    assert str(e.value) == f"{path}: row 3: not valid UTF-8 (byte 0xe9 at line 3, column 14); expected UTF-8 text"


def test_array_records_come_before_the_end_is_read(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(readers, "BLOCK", 64)
    path = tmp_path / "d.json"
    path.write_text("[" + ",".join(json.dumps({"text": f"record {i}"}) for i in range(1000)) + ",]")
    it = readers.iter_file(path)
    assert next(it).data == {"text": "record 0"}  # yielded with only the first block read
    with pytest.raises(DataError, match="Expecting value"):
        list(it)
