"""Checkpoints on disk: written atomically, and unreadable ones reported as such.

Lightning's own ``_atomic_save`` writes a temporary file in the *system* temp folder and moves
it into place: an atomic rename only when both sit on one file system; otherwise the move is a
copy that an interrupted process leaves half-written under the final name, and the bytes are
never ``fsync``-ed. :class:`AtomicCheckpointIO` writes the temporary file next to its target,
flushes it to disk and ``os.replace``-s it, so a checkpoint path holds either the previous
complete file or the new complete file, never a torn one.

Reading goes through :func:`check_checkpoint_file` (a ``torch.save`` file is a zip archive:
its central directory and every member's CRC are checked without unpickling anything) and
:func:`checkpoint_errors`, which turns the low-level errors of a missing, truncated or
foreign file into :class:`~lightning_local.errors.CheckpointError`.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

from lightning_local._atomic import atomic_torch_save
from lightning_local.errors import CheckpointError

__all__ = [
    "AtomicCheckpointIO",
    "check_checkpoint_file",
    "checkpoint_errors",
    "install_atomic_checkpoints",
    "remove_stale_temporaries",
    "save_atomically",
]

_FIX = (
    "Fix: resume from an earlier checkpoint (e.g. the previous epoch's file or last.ckpt), or "
    "train again; checkpoints written through AtomicCheckpointIO are never left half-written."
)


def _is_local(path: Any) -> bool:
    return isinstance(path, (str, os.PathLike)) and "://" not in os.fspath(path)


def check_checkpoint_file(path: str | os.PathLike[str]) -> None:
    """Raise :class:`CheckpointError` when ``path`` is missing or not an intact checkpoint.

    A ``torch.save`` zip archive is checked for its central directory, a pickled payload and
    every member's CRC (nothing is unpickled). Files in torch's legacy (non-zip) format are
    left to the loader.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(
            f"checkpoint '{path}' does not exist or is not a file. Fix: pass the path of a "
            ".ckpt file (Lightning writes them under <log dir>/checkpoints/)."
        )
    if path.stat().st_size == 0:
        raise CheckpointError(f"checkpoint '{path}' is empty (0 bytes). {_FIX}")
    if not zipfile.is_zipfile(path):
        if _looks_like_zip(path):
            raise CheckpointError(f"checkpoint '{path}' is truncated or corrupt. {_FIX}")
        return
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
            if not any(name.endswith("data.pkl") for name in names):
                raise CheckpointError(
                    f"'{path}' is a zip archive but not a torch checkpoint (no data.pkl). "
                    "Fix: pass a .ckpt file written by Lightning."
                )
            broken = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError) as error:
        message = f"checkpoint '{path}' is truncated or corrupt ({error}). {_FIX}"
        raise CheckpointError(message) from error
    if broken is not None:
        raise CheckpointError(f"checkpoint '{path}' is corrupt (bad CRC in {broken!r}). {_FIX}")


def _looks_like_zip(path: Path) -> bool:
    with path.open("rb") as file:
        return file.read(4) == b"PK\x03\x04"


@contextlib.contextmanager
def checkpoint_errors(path: Any) -> Iterator[None]:
    """Turn the errors of reading or applying a checkpoint into :class:`CheckpointError`.

    Checks the file first (:func:`check_checkpoint_file`) when ``path`` is a local path.
    """
    if _is_local(path):
        check_checkpoint_file(path)
    try:
        yield
    except (pickle.UnpicklingError, EOFError, zipfile.BadZipFile) as error:
        raise CheckpointError(f"checkpoint '{path}' cannot be read ({error}). {_FIX}") from error
    except KeyError as error:
        raise CheckpointError(
            f"checkpoint '{path}' lacks the entry {error}; it is not a Lightning checkpoint. "
            "Fix: pass a .ckpt file written by a Trainer (or ModelCheckpoint)."
        ) from error
    except RuntimeError as error:
        message = str(error)
        if "Error(s) in loading state_dict" in message:
            raise CheckpointError(
                f"checkpoint '{path}' does not fit the model: {message.splitlines()[0]} "
                f"{_mismatch_detail(message)}Fix: build the model with the same network "
                "(architecture and width) as the run that wrote the checkpoint."
            ) from error
        if "PytorchStreamReader" in message or "invalid load key" in message:
            message = f"checkpoint '{path}' cannot be read ({error}). {_FIX}"
            raise CheckpointError(message) from error
        raise


def _mismatch_detail(message: str) -> str:
    lines = [line.strip() for line in message.splitlines()[1:] if line.strip()]
    return (" ".join(lines[:3])[:400] + " ") if lines else ""


class AtomicCheckpointIO(TorchCheckpointIO):
    """``torch.save`` to a temporary file beside the target, ``fsync``, then ``os.replace``.

    The library's modules install it in any Trainer that has Lightning's default checkpoint
    IO (at ``setup``); pass it yourself (``Trainer(plugins=[AtomicCheckpointIO()])``) for
    other modules. A save first removes the temporary files a killed save left beside the
    target. Remote (fsspec URL) paths fall back to Lightning's writer. Loading checks the file
    (every zip member's CRC) and raises :class:`CheckpointError` for a missing, truncated or
    corrupt checkpoint.
    """

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None
    ) -> None:
        if storage_options is not None or not _is_local(path):
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        remove_stale_temporaries(path)
        save_atomically(checkpoint, path)

    def load_checkpoint(
        self,
        path: Any,
        map_location: Callable | None = lambda storage, loc: storage,
        weights_only: bool | None = None,
    ) -> dict[str, Any]:
        with checkpoint_errors(path):
            checkpoint = super().load_checkpoint(path, map_location, weights_only)
        if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
            raise CheckpointError(
                f"'{path}' holds no Lightning checkpoint (no 'state_dict' entry). Fix: pass a "
                ".ckpt file written by a Trainer."
            )
        return checkpoint


def remove_stale_temporaries(path: str | os.PathLike[str]) -> list[Path]:
    """Delete the temporary files a killed save of ``path`` left beside it; return them.

    Only one process writes a given checkpoint path (rank 0), so any temporary of it found
    before a new save is a leftover, never a save in progress.
    """
    path = Path(path)
    stale = sorted(path.parent.glob(f".{path.name}.*.tmp")) if path.parent.is_dir() else []
    for leftover in stale:
        leftover.unlink(missing_ok=True)
    return stale


def install_atomic_checkpoints(strategy: Any) -> bool:
    """Give ``strategy`` an :class:`AtomicCheckpointIO` when it has Lightning's default
    ``TorchCheckpointIO`` (a checkpoint IO of the user's own is kept); ``True`` if installed.
    """
    if type(getattr(strategy, "checkpoint_io", None)) is TorchCheckpointIO:
        strategy.checkpoint_io = AtomicCheckpointIO()
        return True
    return False


def save_atomically(obj: Any, path: str | os.PathLike[str]) -> None:
    """``torch.save(obj)`` to ``path`` so that ``path`` is never seen half-written.

    A temporary file beside ``path``, flushed and ``fsync``-ed, then ``os.replace``-d onto it
    (:func:`lightning_local._atomic.atomic_torch_save`).
    """
    atomic_torch_save(obj, path)
