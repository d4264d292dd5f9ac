"""Coordinate-check records as mup's coord-check DataFrame.

References: records written out by hand (every row checked against its record), a frame made by
mup's own ``get_coord_data`` on a tiny muP MLP (columns and dtypes), and the curves that mup's
``plot_coord_data`` draws from our frame (checked against the records' values).
"""

from __future__ import annotations

import math

import matplotlib
import matplotlib.pyplot as plt
import mup.coord_check as mup_coord_check  # mup depends on pandas and seaborn
import pandas as pd
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_local.diagnostics.coord_check import coord_check
from lightning_local.diagnostics.mup_format import coord_check_dataframe
from lightning_local.errors import LocalLearningError

PLOT_COLUMNS = ("width", "module", "t", "l1")  # what plot_coord_data reads by default
EXPECTED_COLUMNS = [
    "width", "module", "t", "l1", "l2", "rms",
    "seed", "rule", "parametrization", "quantity", "layer",
]


def _hand_records() -> list[dict]:
    """bp under mup and sp, 2 widths x 2 steps x 2 layers x 2 quantities, one seed.

    Every value is distinct, so a row matched to the wrong record shows; one is ``None``.
    """
    records = []
    for param, p_offset in (("mup", 0.0), ("sp", 100.0)):
        for width in (16, 32):
            for step in (1, 2):
                for quantity, q_offset in (("activation", 0.0), ("activation_change", 0.5)):
                    for layer in (1, 2):
                        value = p_offset + width / 8 + step / 10 + layer / 100 + q_offset
                        records.append(dict(
                            rule="bp", parametrization=param, width=width, seed=0, step=step,
                            quantity=quantity, layer=layer, value=value,
                        ))
    diverged = next(r for r in records if (r["parametrization"], r["width"], r["step"],
                                           r["quantity"], r["layer"]) ==
                    ("mup", 32, 2, "activation_change", 2))
    diverged["value"] = None
    return records


def _tiny_mup_frame() -> pd.DataFrame:
    from mup import MuReadout, set_base_shapes

    class Net(nn.Module):
        def __init__(self, width: int) -> None:
            super().__init__()
            self.fc = nn.Linear(4, width)
            self.act = nn.Tanh()
            self.out = MuReadout(width, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.out(self.act(self.fc(x)))

    def lazy(width: int):
        return lambda: set_base_shapes(Net(width), Net(8), delta=Net(16))

    generator = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(8, 4, generator=generator),
                         torch.randint(0, 3, (8,), generator=generator))
    with torch.random.fork_rng(devices=[]):
        return mup_coord_check.get_coord_data(
            {16: lazy(16), 32: lazy(32)}, DataLoader(data, batch_size=8), nsteps=2,
            cuda=False, show_progress=False,
        )


def _plot(df: pd.DataFrame, path) -> matplotlib.figure.Figure:
    """mup's plot_coord_data on the Agg backend, without leaking seaborn's style."""
    matplotlib.use("Agg")
    with matplotlib.rc_context():
        return mup_coord_check.plot_coord_data(df, save_to=str(path), legend="full")


def _curves(fig) -> dict[int, set[tuple]]:
    """``{t: {(x..., y...) per drawn curve}}`` (legend handles, which carry no data, left out)."""
    curves = {}
    for t, ax in enumerate(fig.axes, start=1):
        curves[t] = {
            (tuple(line.get_xdata()), tuple(round(float(y), 9) for y in line.get_ydata()))
            for line in ax.lines if len(line.get_xdata())
        }
    return curves


def test_rows_match_the_records():
    records = _hand_records()
    df = coord_check_dataframe(records)
    assert list(df.columns) == EXPECTED_COLUMNS
    assert len(df) == len(records) == 32

    for index, record in enumerate(records):
        row = df.iloc[index]  # rows keep the records' order
        assert row["width"] == record["width"]
        assert row["t"] == record["step"]
        assert row["seed"] == record["seed"]
        assert row["layer"] == record["layer"]
        assert row["rule"] == record["rule"]
        assert row["parametrization"] == record["parametrization"]
        assert row["quantity"] == record["quantity"]
        for column in ("l1", "l2", "rms"):
            if record["value"] is None:
                assert math.isnan(row[column])
            else:
                assert row[column] == pytest.approx(record["value"], abs=0, rel=1e-15)

    # a few rows spelled out
    first = df.iloc[0]
    assert (first["module"], first["width"], first["t"], first["l1"]) == (
        "layer_1:activation", 16, 1, pytest.approx(2.11))
    change = df[(df.parametrization == "sp") & (df.width == 32) & (df.t == 2)
                & (df.quantity == "activation_change") & (df.layer == 2)]
    assert list(change["module"]) == ["layer_2:activation_change"]
    assert list(change["rms"]) == [pytest.approx(100 + 4 + 0.2 + 0.02 + 0.5)]
    assert int(df["l1"].isna().sum()) == 1

    assert str(df["width"].dtype) == "int64" and str(df["t"].dtype) == "int64"
    assert str(df["layer"].dtype) == "int64" and str(df["seed"].dtype) == "int64"
    assert str(df["l1"].dtype) == "float64"


def test_selection_keeps_only_the_chosen_records_and_names_layers():
    records = _hand_records()
    df = coord_check_dataframe(records, rule="bp", parametrization="mup",
                               quantity="activation")
    assert len(df) == 2 * 2 * 2
    assert set(df["module"]) == {"layer_1", "layer_2"}
    assert set(df["parametrization"]) == {"mup"} and set(df["quantity"]) == {"activation"}
    expected = {
        (r["width"], r["step"], f"layer_{r['layer']}"): r["value"] for r in records
        if r["parametrization"] == "mup" and r["quantity"] == "activation"
    }
    got = {(w, t, m): v for w, t, m, v in zip(df.width, df.t, df.module, df.l1)}
    assert got == pytest.approx(expected)

    both = coord_check_dataframe(records, parametrization="sp")
    assert len(both) == 16 and set(both["quantity"]) == {"activation", "activation_change"}


def test_bad_records_are_refused():
    records = _hand_records()
    with pytest.raises(LocalLearningError, match="no record has rule='pc'"):
        coord_check_dataframe(records, rule="pc")
    with pytest.raises(LocalLearningError, match="share"):
        coord_check_dataframe(records + records[:1])
    with pytest.raises(LocalLearningError, match="step 0"):
        coord_check_dataframe([{**records[0], "step": 0}])
    with pytest.raises(LocalLearningError, match="value"):
        coord_check_dataframe([{k: v for k, v in records[0].items() if k != "value"}])
    empty = coord_check_dataframe([])
    assert list(empty.columns) == EXPECTED_COLUMNS and len(empty) == 0


def test_columns_and_dtypes_match_mups_get_coord_data():
    theirs = _tiny_mup_frame()
    ours = coord_check_dataframe(_hand_records(), parametrization="mup")
    assert set(PLOT_COLUMNS) <= set(theirs.columns)
    assert set(PLOT_COLUMNS) <= set(ours.columns)
    for column in PLOT_COLUMNS:
        assert ours[column].dtype.kind == theirs[column].dtype.kind, column
        assert ours[column].dtype == theirs[column].dtype, column
    # both count t from 1 over the same number of steps
    assert sorted(theirs["t"].unique()) == sorted(ours["t"].unique()) == [1, 2]
    # the dtypes survive concatenation (the l1 values differ in meaning: see the docstring)
    joined = pd.concat([theirs[list(PLOT_COLUMNS)], ours[list(PLOT_COLUMNS)]])
    for column in PLOT_COLUMNS:
        assert joined[column].dtype == theirs[column].dtype, column


def test_plot_coord_data_draws_the_records(tmp_path):
    records = _hand_records()
    df = coord_check_dataframe(records, rule="bp", parametrization="mup",
                               quantity="activation")
    fig = _plot(df, tmp_path / "cc.png")
    png = (tmp_path / "cc.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 1000
    assert len(fig.axes) == 2  # one panel per t
    assert {t.get_text() for t in fig.axes[0].get_legend().get_texts()} == {"layer_1",
                                                                            "layer_2"}
    expected = {
        t: {
            ((16.0, 32.0), tuple(round(r["value"], 9) for r in sorted(
                (r for r in records if r["parametrization"] == "mup"
                 and r["quantity"] == "activation" and r["step"] == t
                 and r["layer"] == layer), key=lambda r: r["width"])))
            for layer in (1, 2)
        }
        for t in (1, 2)
    }
    assert _curves(fig) == expected  # sp's rows would have moved the means
    plt.close(fig)


def test_a_real_coord_check_converts_and_plots(tmp_path):
    result = coord_check(["bp"], ["mup"], [16, 32], steps=2, num_samples=400, batch_size=32,
                         probe_size=32)
    everything = coord_check_dataframe(result.records)
    assert len(everything) == len(result.records)
    assert set(everything["module"]) == {
        f"layer_{l}:{q}" for l in (1, 2, 3)
        for q in ("activation", "activation_change", "weight_update")
    }

    df = coord_check_dataframe(result.records, rule="bp", parametrization="mup",
                               quantity="activation")
    pd.testing.assert_frame_equal(  # the result's own method is the same conversion
        result.to_dataframe(rule="bp", parametrization="mup", quantity="activation"), df
    )
    assert len(df) == 2 * 2 * 3  # widths x steps x layers
    by_key = {(r["width"], r["step"], r["layer"]): r["value"] for r in result.records
              if r["quantity"] == "activation"}
    assert {(w, t, l): v for w, t, l, v in zip(df.width, df.t, df.layer, df.l1)} == by_key
    assert df["l1"].notna().all() and (df["l1"] > 0).all()

    fig = _plot(df, tmp_path / "cc.png")
    png = (tmp_path / "cc.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 1000
    assert len(fig.axes) == 2
    drawn = _curves(fig)
    for t in (1, 2):
        assert drawn[t] == {
            ((16.0, 32.0), (round(by_key[16, t, l], 9), round(by_key[32, t, l], 9)))
            for l in (1, 2, 3)
        }
    plt.close(fig)
