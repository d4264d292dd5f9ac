"""Atomic file writes: the new content or the old one, never a torn file or a stray temporary.

References: the bytes read back; the file's permission bits against ``0o666 & ~umask`` (what a
plain ``open(path, "w")`` creates); a writer interrupted mid-way (``KeyboardInterrupt``) leaving
the old content and nothing else in the folder.
"""

from __future__ import annotations

import os
import stat

import pytest
import torch

from lightning_local._atomic import (
    atomic_torch_save,
    atomic_write,
    atomic_write_bytes,
    atomic_write_text,
)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_bytes_and_text_are_written_and_replaced(tmp_path):
    path = tmp_path / "new" / "folder" / "file.bin"
    assert atomic_write_bytes(path, b"\x00first") == path
    assert path.read_bytes() == b"\x00first"
    atomic_write_text(path, "second \u00e9\n")
    assert path.read_bytes() == "second \u00e9\n".encode()
    assert [p.name for p in path.parent.iterdir()] == ["file.bin"]


@pytest.mark.skipif(os.name != "posix", reason="POSIX permission bits")
def test_permissions_are_those_of_a_plain_open_unless_given(tmp_path):
    plain = tmp_path / "plain.txt"
    plain.write_text("x")
    written = atomic_write_text(tmp_path / "atomic.txt", "x")
    assert stat.S_IMODE(written.stat().st_mode) == stat.S_IMODE(plain.stat().st_mode)
    assert stat.S_IMODE(written.stat().st_mode) == 0o666 & ~_umask()
    chosen = atomic_write_text(tmp_path / "chosen.txt", "x", mode=0o640)
    assert stat.S_IMODE(chosen.stat().st_mode) == 0o640


def test_an_interrupted_write_leaves_the_old_content_and_no_temporary(tmp_path):
    path = tmp_path / "results.txt"
    atomic_write_text(path, "complete\n")

    def torn(file):
        file.write(b"half a")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(path, torn)
    assert path.read_text() == "complete\n"
    assert [p.name for p in tmp_path.iterdir()] == ["results.txt"]
    with pytest.raises(KeyboardInterrupt):
        atomic_write(tmp_path / "never.txt", torn)
    assert [p.name for p in tmp_path.iterdir()] == ["results.txt"]


def test_the_temporary_file_sits_beside_the_target(tmp_path):
    seen = []

    def write(file):
        seen.extend(p.name for p in tmp_path.iterdir())
        file.write(b"x")

    atomic_write(tmp_path / "a.bin", write)
    (name,) = seen
    assert name.startswith(".a.bin.") and name.endswith(".tmp")
    assert [p.name for p in tmp_path.iterdir()] == ["a.bin"]


def test_torch_save_variant_round_trips(tmp_path):
    state = {"w": torch.arange(4.0), "step": 3}
    path = atomic_torch_save(state, tmp_path / "state.pt")
    loaded = torch.load(path, weights_only=True)
    assert torch.equal(loaded["w"], state["w"]) and loaded["step"] == 3
