"""Checkpoints are safe by default: atomic, validated, and no leftovers from killed saves.

References: Lightning's plain ``Trainer`` as the README shows it (no plugin passed), the file
as saved (byte for byte), and a process killed with SIGKILL in the middle of its saves.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from torch.utils.data import DataLoader, TensorDataset

from lightning_local.errors import CheckpointError
from lightning_local.models import MLP
from lightning_local.modules import AtomicCheckpointIO, BackpropModule

ROOT = Path(__file__).resolve().parents[1]


def _loader() -> DataLoader:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(32, 40, generator=generator)
    return DataLoader(TensorDataset(x, torch.randint(0, 10, (32,), generator=generator)),
                      batch_size=16)


def _trainer(tmp_path: Path, **kwargs) -> L.Trainer:
    options = dict(accelerator="cpu", max_steps=2, logger=False, enable_progress_bar=False,
                   enable_model_summary=False, default_root_dir=tmp_path)
    return L.Trainer(**{**options, **kwargs})


def test_a_plain_trainer_gets_atomic_checkpoints_and_a_users_own_io_is_kept(tmp_path):
    trainer = _trainer(tmp_path)
    assert type(trainer.strategy.checkpoint_io) is TorchCheckpointIO  # Lightning's default
    trainer.fit(BackpropModule(network=MLP(width=16)), _loader())
    assert isinstance(trainer.strategy.checkpoint_io, AtomicCheckpointIO)

    class Mine(TorchCheckpointIO):
        pass

    own = _trainer(tmp_path / "own", plugins=[Mine()])
    own.fit(BackpropModule(network=MLP(width=16)), _loader())
    assert type(own.strategy.checkpoint_io) is Mine


def test_a_flipped_byte_is_refused_on_resume(tmp_path):
    trainer = _trainer(tmp_path)
    trainer.fit(BackpropModule(network=MLP(width=16)), _loader())
    path = Path(trainer.checkpoint_callback.best_model_path)
    data = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as archive:  # the largest record: a weight's bytes
        record = max(archive.infolist(), key=lambda info: info.file_size)
    header = record.header_offset
    name_length = int.from_bytes(data[header + 26:header + 28], "little")
    extra_length = int.from_bytes(data[header + 28:header + 30], "little")
    start = header + 30 + name_length + extra_length
    data[start + record.file_size // 2] ^= 0x01  # one bit, inside the tensor data
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="corrupt"):
        _trainer(tmp_path / "again", max_steps=4).fit(
            BackpropModule(network=MLP(width=16)), _loader(), ckpt_path=path)


def test_a_save_removes_the_leftovers_of_a_killed_save(tmp_path):
    trainer = _trainer(tmp_path)
    trainer.fit(BackpropModule(network=MLP(width=16)), _loader())
    target = tmp_path / "model.ckpt"
    leftover = tmp_path / ".model.ckpt.abc123.tmp"
    leftover.write_bytes(b"half a checkpoint")
    other = tmp_path / ".other.ckpt.abc123.tmp"  # another target's: not ours to remove
    other.write_bytes(b"x")
    trainer.save_checkpoint(target)
    assert not leftover.exists() and other.exists()
    assert BackpropModule.load_from_checkpoint(target).network.width == 16


SAVER = """
import sys, torch, lightning as L
from torch.utils.data import DataLoader, TensorDataset
from lightning_local.models import MLP
from lightning_local.modules import BackpropModule
x = torch.randn(16, 40); y = torch.randint(0, 10, (16,))
trainer = L.Trainer(accelerator="cpu", max_steps=1, logger=False, enable_progress_bar=False,
                    enable_model_summary=False, enable_checkpointing=False)
model = BackpropModule(network=MLP(width=512))
trainer.fit(model, DataLoader(TensorDataset(x, y), batch_size=16))
print("ready", flush=True)
for i in range(10**6):
    with torch.no_grad():
        model.network[0][0].weight.add_(1.0)
    trainer.save_checkpoint(sys.argv[1])
"""


def test_checkpoints_survive_sigkill_during_saves(tmp_path):
    """Killed at random moments while saving in a loop: the file always loads (or the first
    save had not finished), and the next save leaves no temporary behind."""
    script = tmp_path / "saver.py"
    script.write_text(SAVER)
    target = tmp_path / "loop.ckpt"
    generator = torch.Generator().manual_seed(0)
    for _ in range(4):
        process = subprocess.Popen([sys.executable, str(script), str(target)], cwd=ROOT,
                                   stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        assert process.stdout.readline().strip() == "ready"
        time.sleep(0.05 + 0.4 * float(torch.rand((), generator=generator)))
        os.kill(process.pid, signal.SIGKILL)
        process.wait()
        if target.exists():
            loaded = BackpropModule.load_from_checkpoint(target)  # never torn
            assert loaded.network.width == 512
    assert target.exists()
    trainer = _trainer(tmp_path / "fit")
    trainer.fit(BackpropModule(network=MLP(width=16)), _loader())
    trainer.save_checkpoint(target)
    assert not list(tmp_path.glob(".loop.ckpt.*.tmp"))
