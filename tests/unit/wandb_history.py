"""Read the history rows of an offline wandb run file (`run-<id>.wandb`) for tests.

    rows = wandb_history(path, last_step=30)   # [{"_step": 1, "train/loss": 6.2, ...}, ...]

wandb >= 0.19 writes the file from its Go core and ships no Python reader: the file is a
7-byte header (":W&B", magic, version) followed by LevelDB-log blocks of 32 KiB whose records
(FULL, or FIRST/MIDDLE/LAST chunks) are wandb_internal_pb2.Record protobufs. History items hold
a key (or a nested key, as for images) and a JSON value. The core may still be writing when
`run.finish()` has returned in the trainer's process, so `last_step` waits (a few seconds at
most) until a row of that step is there.
"""

from __future__ import annotations

import json
import struct
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

_BLOCK = 32768
_HEADER = 7
_FULL, _LAST = 1, 4


def _records(path: Path) -> Iterator[bytes]:
    data = path.read_bytes()
    if data[:4] != b":W&B":
        raise ValueError(f"{path} is not a wandb run file")
    pos, parts = _HEADER, []
    while pos + _HEADER <= len(data):
        left = _BLOCK - pos % _BLOCK
        if left < _HEADER:  # the block's trailer
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + _HEADER])
        if kind == 0 and length == 0:  # zero padding up to the block's end
            pos += left
            continue
        if pos + _HEADER + length > len(data):  # the core is still writing this record
            return
        parts.append(data[pos + _HEADER : pos + _HEADER + length])
        pos += _HEADER + length
        if kind in (_FULL, _LAST):
            yield b"".join(parts)
            parts = []


def wandb_history(path: Path, last_step: int | None = None, wait_s: float = 30.0) -> list[dict]:
    """The history rows of `path`; with `last_step`, once a row of that step is written."""
    from google.protobuf.message import DecodeError

    deadline = time.monotonic() + wait_s
    while True:
        try:
            rows: list[dict] | None = _read_history(path)
        except DecodeError:  # a record caught half written; read again
            if time.monotonic() > deadline:
                raise
            rows = None
        if rows is not None and (
            last_step is None or any(r.get("_step") == last_step for r in rows)
        ):
            return rows
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path} has no history row of step {last_step}")
        time.sleep(0.2)


def _read_history(path: Path) -> list[dict[str, Any]]:
    from wandb.proto import wandb_internal_pb2

    rows = []
    for raw in _records(path):
        record = wandb_internal_pb2.Record()
        record.ParseFromString(raw)
        if record.WhichOneof("record_type") == "history":
            rows.append(
                {
                    (item.key or "/".join(item.nested_key)): json.loads(item.value_json)
                    for item in record.history.item
                }
            )
    return rows
