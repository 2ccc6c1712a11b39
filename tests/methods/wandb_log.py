"""Read an offline wandb run's `.wandb` file (a LevelDB-style log of protobuf records) back into Python: the
history rows and the config, to check what loratune logged without a network (wandb has no reader for it)."""

from __future__ import annotations

import json
import struct
from pathlib import Path

BLOCK = 32768
HEADER = 7  # ":W&B", version (uint16), magic (uint8)


def records(path: Path) -> list[bytes]:
    """The payloads of every record in the file, fragments (FIRST, MIDDLE, LAST) joined."""
    data = path.read_bytes()
    if data[:4] != b":W&B":
        raise ValueError(f"{path} is not a wandb log")
    out, pos, parts = [], HEADER, b""
    while pos + 7 <= len(data):
        left = BLOCK - pos % BLOCK
        if left < 7:
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0 and length == 0:
            pos += left
            continue
        chunk = data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind == 1:
            out.append(chunk)
        elif kind == 2:
            parts = chunk
        elif kind == 3:
            parts += chunk
        elif kind == 4:
            out.append(parts + chunk)
            parts = b""
    return out


def read_run(folder: Path) -> tuple[list[dict], dict]:
    """(history rows with `_step`, config) of the offline run in `folder` (the one holding run-ID.wandb)."""
    from wandb.proto import wandb_internal_pb2 as pb

    history, config = [], {}
    for payload in records(next(folder.glob("*.wandb"))):
        rec = pb.Record()
        rec.ParseFromString(payload)
        which = rec.WhichOneof("record_type")
        if which == "history":
            row = {"/".join(i.nested_key) if i.nested_key else i.key: json.loads(i.value_json) for i in rec.history.item}
            row["_step"] = rec.history.step.num if rec.history.HasField("step") else row.get("_step")
            history.append(row)
        elif which in ("run", "config"):
            updates = rec.run.config.update if which == "run" else rec.config.update
            for item in updates:
                key = "/".join(item.nested_key) if item.nested_key else item.key
                config[key] = json.loads(item.value_json)
    return history, config
