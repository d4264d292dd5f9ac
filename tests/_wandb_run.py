"""Test helper: an offline W&B run in a test's folder, and reading it back.

The offline run is read back from its ``.wandb`` file: a LevelDB-style log (32 KiB blocks,
7-byte record headers: crc32, length, type) of ``wandb_internal_pb2.Record`` protobufs behind
a 7-byte ``:W&B`` file header.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest


def offline_wandb(folder: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Point wandb's folders at ``folder`` and make it offline (the suite disables it)."""
    for name in ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(name, str(folder))
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    return folder


def records(path: Path) -> list:
    """The ``Record`` protobufs of a ``.wandb`` file, in order."""
    from wandb.proto import wandb_internal_pb2

    data, block = path.read_bytes(), 32768
    assert data[:4] == b":W&B"
    found, pending, position = [], b"", 7
    while position + 7 <= len(data):
        if block - position % block < 7:  # a block's tail too short for a header is padding
            position += block - position % block
            continue
        _, length, kind = struct.unpack("<IHB", data[position:position + 7])
        if kind == 0:
            break
        pending += data[position + 7:position + 7 + length]
        position += 7 + length
        if kind in (1, 4):  # FULL or LAST: a whole record
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            found.append(record)
            pending = b""
    return found


def read_run(folder: Path) -> tuple[dict, list[dict]]:
    """The config (last value per key) and the history rows of the only offline run."""
    (path,) = folder.glob("wandb/offline-run-*/run-*.wandb")
    config, history = {}, []
    for record in records(path):
        kind = record.WhichOneof("record_type")
        # config updates made while the run starts are sent inside its run record
        updates = {"config": record.config, "run": record.run.config}.get(kind)
        if updates is not None:
            config.update({item.key: json.loads(item.value_json) for item in updates.update})
        elif kind == "history":
            history.append({
                item.key or "/".join(item.nested_key): json.loads(item.value_json)
                for item in record.history.item
            })
    return config, history


