"""``--config sweep.yaml`` for ``lightning-local sweep`` and ``coord-check`` (``config_file``).

References: the records and sizes a config file produces against a Python ``sweep()`` /
``coord_check()`` of the same settings; a command-line option against the file's value; the
file's user network imported from the current folder by its ``class_path``.
"""

from __future__ import annotations

import json
import sys

import pytest
import yaml

from lightning_local.diagnostics import coord_check as coord_check_module
from lightning_local.diagnostics.coord_check import coord_check
from lightning_local.errors import LocalLearningError
from lightning_local.sweeps import SweepConfig, log2_grid, read_results, sweep
from lightning_local.sweeps.cli import main as sweep_main
from lightning_local.sweeps.config_file import read_config

USERNETS = '''
from torch import nn


class UserNet(nn.Module):
    def __init__(self, width, in_features=40, num_classes=10, hidden=2):
        super().__init__()
        sizes = [in_features] + [width] * hidden
        self.blocks = nn.ModuleList(
            [nn.Sequential(nn.Linear(a, b), nn.Tanh()) for a, b in zip(sizes, sizes[1:])]
            + [nn.Linear(width, num_classes)]
        )

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return x
'''

MODEL = {"class_path": "usernets.UserNet", "init_args": {"hidden": 2},
         "width_argument": "width"}


@pytest.fixture
def folder(tmp_path, monkeypatch):
    """``tmp_path`` as the current folder holding ``usernets.py``; sys.path and sys.modules
    are restored afterwards (the config's class_path is imported from the current folder)."""
    (tmp_path / "usernets.py").write_text(USERNETS)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))
    sys.modules.pop("usernets", None)
    yield tmp_path
    sys.modules.pop("usernets", None)


def _data(data_dir):
    return {"class_path": "lightning_local.data.MNIST1DDataModule",
            "init_args": {"data_dir": data_dir, "num_samples": 300}}


def _write(path, values):
    path.write_text(yaml.safe_dump(values))
    return path.name


def test_sweep_from_yaml(folder, data_dir, capsys):
    values = dict(model=MODEL, data=_data(data_dir), rules=["bp", "dtp"],
                  parametrizations=["sp", "mup"], widths=[16, 32], lrs={"log2": [-3, -2]},
                  epochs=1, batch_size=64, base_width=16, output="from_yaml")
    name = _write(folder / "sweep.yaml", values)
    assert read_config(name)["lrs"] == [0.125, 0.25]
    assert sweep_main(["--config", name, "--quiet", "--no-plot"]) == 0
    records = read_results(folder / "from_yaml" / "results.jsonl")
    assert len(records) == 2 * 2 * 2 * 2
    assert all(r["model"] == MODEL and r["data"] == _data(data_dir) for r in records)
    assert all(not r["diverged"] for r in records)
    assert not (folder / "from_yaml" / "transfer.png").exists()

    config = SweepConfig(model=MODEL, data=_data(data_dir), rules=["bp", "dtp"],
                         parametrizations=["sp", "mup"], widths=[16, 32],
                         lrs=log2_grid(-3, -2), epochs=1, batch_size=64, base_width=16)
    python = sweep(config, folder / "from_python", log=None, plot=False).records
    assert [r["key"] for r in records] == [r["key"] for r in python]
    for got, want in zip(records, python):
        assert got["train_loss"] == pytest.approx(want["train_loss"], rel=1e-6)
        assert got["test_acc"] == pytest.approx(want["test_acc"])

    # a command-line option overrides the file
    assert sweep_main(["--config", name, "--quiet", "--no-plot", "--widths", "16",
                       "--output", "override"]) == 0
    narrow = read_results(folder / "override" / "results.jsonl")
    assert {r["width"] for r in narrow} == {16}
    assert [r["key"] for r in narrow] == [r["key"] for r in records if r["width"] == 16]
    # rerunning the file trains nothing
    capsys.readouterr()
    assert sweep_main(["--config", name, "--quiet", "--no-plot"]) == 0
    assert "0 runs trained, 16 skipped" in capsys.readouterr().err


def test_sweep_config_errors(folder, data_dir, capsys):
    bad = _write(folder / "bad.yaml", dict(model=MODEL, widht=[16], epochs=1))
    assert sweep_main(["--config", bad, "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "widht" in err and "unknown option" in err
    missing = _write(folder / "missing.yaml", dict(
        model={"class_path": "no_such_module_abc.Net"}, widths=[16], epochs=1, lrs=[0.1],
        output="missing"))
    assert sweep_main(["--config", missing, "--quiet", "--no-plot"]) == 2
    assert "no_such_module_abc" in capsys.readouterr().err
    assert sweep_main(["--config", "nowhere.yaml"]) == 2
    assert "nowhere.yaml" in capsys.readouterr().err
    (folder / "lrs.yaml").write_text("lrs: {log10: [-3, -2]}\n")
    with pytest.raises(LocalLearningError, match="log2"):
        read_config("lrs.yaml")


def test_coord_check_from_yaml(folder, data_dir, capsys):
    values = dict(model=MODEL, data=_data(data_dir), rules=["bp", "pc-si"],
                  parametrizations=["sp", "mup"], widths=[16, 32], steps=2, lr=0.05,
                  batch_size=32, probe_size=24, output="coord")
    name = _write(folder / "coord.yaml", values)
    assert coord_check_module.main(["--config", name]) == 0
    saved = json.loads((folder / "coord" / "coord_check.json").read_text())
    assert saved["settings"]["model"] == MODEL
    assert saved["settings"]["data"] == _data(data_dir)
    assert saved["settings"]["widths"] == [16, 32]
    assert "| pc-si | mup | error |" in capsys.readouterr().out
    python = coord_check(["bp", "pc-si"], ["sp", "mup"], [16, 32], steps=2, lr=0.05,
                         batch_size=32, probe_size=24, model=MODEL, data=_data(data_dir))
    assert len(saved["records"]) == len(python.records) > 0
    for got, want in zip(saved["records"], python.records):
        assert {k: v for k, v in got.items() if k != "value"} == {
            k: v for k, v in want.items() if k != "value"}
        assert got["value"] == pytest.approx(want["value"], rel=1e-6)

    # a command-line option overrides the file
    assert coord_check_module.main(["--config", name, "--widths", "16", "24",
                                    "--output", "narrow"]) == 0
    narrow = json.loads((folder / "narrow" / "coord_check.json").read_text())
    assert {r["width"] for r in narrow["records"]} == {16, 24}

    bad = _write(folder / "bad.yaml", dict(values, stepz=3))
    capsys.readouterr()
    assert coord_check_module.main(["--config", bad]) == 2
    assert "stepz" in capsys.readouterr().err


def test_the_builtin_sweep_config_is_the_committed_mnist1d_sweep(data_dir):
    """examples/sweeps/mnist1d.yaml names exactly the runs of the committed results
    (docs/results/transfer_mnist1d.jsonl), and rerunning a few of them with this code gives
    the committed losses (stored to 5 significant digits)."""
    from pathlib import Path

    from lightning_local.sweeps.cli import parse
    from lightning_local.sweeps.runner import train_run

    root = Path(__file__).resolve().parents[1]
    committed = [json.loads(line) for line in
                 (root / "docs/results/transfer_mnist1d.jsonl").read_text().splitlines()]
    config, _ = parse(["--config", str(root / "examples/sweeps/mnist1d.yaml")])
    specs = config.run_specs()
    identity = ("rule", "parametrization", "width", "lr", "seed")
    assert sorted(tuple(s[k] for k in identity) for s in specs) == sorted(
        tuple(r[k] for k in identity) for r in committed
    )
    by_run = {tuple(r[k] for k in identity): r for r in committed}
    for spec in specs:
        if spec["width"] == 64 and spec["seed"] == 0 and spec["lr"] == 2.0**-3:
            record = by_run[tuple(spec[k] for k in identity)]
            rerun = train_run({**spec, "_data_dir": data_dir})
            assert float(f"{rerun['train_loss']:.5g}") == pytest.approx(
                record["train_loss"], rel=1e-12), spec["rule"]
