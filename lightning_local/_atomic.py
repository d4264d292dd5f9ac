"""Atomic file writes: a path holds either its previous complete content or the new one.

Every writer here goes through :func:`atomic_write`:

1. create a temporary file ``.<name>.<random>.tmp`` in the target's *own* folder (created if
   needed), so that the final rename never crosses a file system;
2. write the content, ``flush`` and ``fsync`` it, so the bytes are on disk before the rename;
3. give it the permissions ``mode`` (default: those of a plain ``open(path, "w")``,
   ``0o666`` minus the umask; :func:`tempfile.mkstemp` creates it ``0o600``);
4. ``os.replace`` it onto the target (atomic on POSIX and Windows);
5. ``fsync`` the folder, so the rename itself survives a crash (skipped where the platform
   cannot open a folder).

On any error in steps 1-4, ``KeyboardInterrupt`` included, the temporary file is removed and
the target is left untouched. Readers therefore never see a torn file, and a crashed writer
leaves at most the old content (plus, after a power loss in step 2, a stray ``.tmp`` file).

Nothing here imports torch until :func:`atomic_torch_save` is called.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

__all__ = ["atomic_torch_save", "atomic_write", "atomic_write_bytes", "atomic_write_text"]


def atomic_write(
    path: str | os.PathLike[str], write: Callable[[IO[bytes]], Any], *, mode: int | None = None
) -> Path:
    """Write ``path`` atomically: ``write(file)`` fills a temporary binary file beside it.

    Args:
        path: the target file; its folder is created if missing.
        write: called once with the open temporary file (binary, write mode); it must not
            close the file.
        mode: permission bits of the new file; ``None`` gives ``0o666`` minus the umask.

    Returns:
        ``path`` as a :class:`~pathlib.Path`.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as file:
            write(file)
            file.flush()
            os.fsync(file.fileno())
        os.chmod(temporary, 0o666 & ~_umask() if mode is None else mode)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    _fsync_directory(path.parent)
    return path


def atomic_write_bytes(
    path: str | os.PathLike[str], data: bytes, *, mode: int | None = None
) -> Path:
    """Write ``data`` to ``path`` atomically (see :func:`atomic_write`)."""
    return atomic_write(path, lambda file: file.write(data), mode=mode)


def atomic_write_text(
    path: str | os.PathLike[str], text: str, *, encoding: str = "utf-8", mode: int | None = None
) -> Path:
    """Write ``text`` to ``path`` atomically, encoded with ``encoding``.

    Newlines are written as given (no translation to the platform's line separator).
    """
    return atomic_write_bytes(path, text.encode(encoding), mode=mode)


def atomic_torch_save(obj: Any, path: str | os.PathLike[str], *, mode: int | None = None) -> Path:
    """``torch.save(obj)`` to ``path`` atomically (see :func:`atomic_write`)."""
    import torch

    return atomic_write(path, lambda file: torch.save(obj, file), mode=mode)


def _fsync_directory(folder: Path) -> None:
    """Persist the directory entry of a rename (not possible everywhere: then a no-op)."""
    with contextlib.suppress(OSError):
        directory = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)


def _umask() -> int:
    """The process's umask (read by setting it and setting it back)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask
