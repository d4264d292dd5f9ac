"""Figures: the transfer and coordinate-check plots are written as palette PNGs, atomically,
and drawing them needs nothing from the sweeps.

References: PIL reads each file back as a 64-colour palette image; nothing but the figure is
left in the folder; a fresh interpreter that imports the plots has no sweep module loaded.
"""

from __future__ import annotations

import subprocess
import sys

from PIL import Image

from lightning_local.diagnostics.plots import plot_coord_check, plot_transfer


def _sweep_records() -> list[dict]:
    records = []
    for width in (16, 32):
        for lr in (0.05, 0.1, 0.2):
            diverged = lr == 0.2 and width == 32
            records.append(dict(rule="bp", parametrization="mup", width=width, lr=lr, seed=0,
                                train_loss=None if diverged else 1.0 + abs(lr - 0.1) + width / 1e3,
                                diverged=diverged))
    return records


def test_transfer_figure_is_a_palette_png_and_nothing_else_is_left(tmp_path):
    path = plot_transfer(_sweep_records(), tmp_path / "transfer.png", title="bp")
    assert path == tmp_path / "transfer.png"
    with Image.open(path) as image:
        assert image.format == "PNG" and image.mode == "P"
    assert [p.name for p in tmp_path.iterdir()] == ["transfer.png"]


def test_coord_check_figure_is_written(tmp_path):
    records = [dict(rule="bp", parametrization=param, width=w, seed=0, step=1, quantity=q,
                    layer=layer, value=float(w) ** (0.5 if param == "sp" else 0.0))
               for param in ("sp", "mup") for w in (8, 16, 32) for q in ("activation", "error")
               for layer in (1, 2)]
    slopes = [dict(rule="bp", parametrization=p, quantity=q, layer=layer, step=1,
                   slope=0.5 if p == "sp" else 0.0)
              for p in ("sp", "mup") for q in ("activation", "error") for layer in (1, 2)]
    path = plot_coord_check(records, slopes, tmp_path / "coord.png", "bp")
    with Image.open(path) as image:
        assert image.size[0] > 100
    assert [p.name for p in tmp_path.iterdir()] == ["coord.png"]


def test_importing_the_plots_loads_no_sweep_module():
    code = ("import sys, lightning_local.diagnostics.plots; "
            "print(sorted(m for m in sys.modules if m.startswith('lightning_local.sweeps')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
