"""Coordinate-check records as the pandas DataFrame ``mup``'s plotting helpers read.

``mup`` users draw coordinate checks with ``mup.coord_check.plot_coord_data(df, y='l1',
x='width', hue='module')``, where ``df`` comes from ``mup.coord_check.get_coord_data``.
:func:`coord_check_dataframe` (or :meth:`CoordCheckResult.to_dataframe
<lightning_local.diagnostics.coord_check.CoordCheckResult.to_dataframe>`) turns the records of
a coordinate check into such a frame, so the same call draws a local rule's coordinate check::

    from mup.coord_check import plot_coord_data

    result = coord_check(["pc-si-fpa"], ["mup"], [64, 128, 256])
    df = result.to_dataframe(rule="pc-si-fpa", parametrization="mup", quantity="activation")
    plot_coord_data(df, save_to="cc.png")          # y='l1' holds the rms, see below
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from lightning_local.errors import LocalLearningError

if TYPE_CHECKING:
    import pandas

__all__ = ["COLUMNS", "coord_check_dataframe"]

#: The frame's columns, in order. ``width``, ``module``, ``t`` and ``l1`` are the columns
#: ``mup.coord_check.get_coord_data`` writes and ``plot_coord_data`` reads.
COLUMNS = (
    "width", "module", "t", "l1", "l2", "rms",
    "seed", "rule", "parametrization", "quantity", "layer",
)

_KEYS = ("rule", "parametrization", "width", "seed", "step", "quantity", "layer", "value")


def coord_check_dataframe(
    records: Sequence[Mapping[str, Any]],
    *,
    rule: str | None = None,
    parametrization: str | None = None,
    quantity: str | None = None,
) -> pandas.DataFrame:
    """The coordinate-check ``records`` as a DataFrame in ``mup.coord_check``'s format.

    One row per record, i.e. per ``(rule, parametrization, width, seed, step, quantity,
    layer)``, in the order of ``records``, after keeping only the records whose ``rule``,
    ``parametrization`` and ``quantity`` equal the given ones (``None`` keeps all).

    Columns (dtypes as ``get_coord_data`` builds them: one ``pandas.DataFrame`` of dicts):

    ==================  ========================================================================
    ``width``           the record's ``width`` (int64), as ``get_coord_data``'s width keys
    ``module``          ``"layer_<l>:<quantity>"``, e.g. ``"layer_2:activation"``; just
                        ``"layer_<l>"`` when ``quantity`` is given (then all rows share it).
                        mup names a row ``"<module name>:<which tensor>"`` the same way
    ``t``               the record's ``step`` (int64): ``1 .. k``, like mup's ``t``, which
                        counts training steps from 1. The moment differs: mup's row ``t`` is
                        measured in step ``t``'s forward pass, *before* its update (mup's
                        ``t=1`` is the initialization); ours is measured *after* step ``t``'s
                        update. So our ``t`` has seen one update more than mup's ``t``. It is
                        not shifted to ``t + 1`` because ``plot_coord_data`` draws ``t`` into
                        subplot number ``t`` of ``len(unique t)`` and needs ``t = 1 .. k``
    ``l1``              the record's **rms** ``sqrt(mean(v^2))`` (float64), see below
    ``l2``              the same rms, under the name mup's ``FDICT`` gives this statistic
    ``rms``             the same rms, under this library's name
    ``seed``            the record's seed (int64)
    ``rule``            the record's rule variant (string)
    ``parametrization`` the record's parametrization (string)
    ``quantity``        the record's quantity (string)
    ``layer``           the record's layer ``1 .. L`` (int64)
    ==================  ========================================================================

    What ``l1`` holds: mup's ``l1`` is the mean absolute coordinate ``mean(|v|)``; the records
    only hold the rms ``sqrt(mean(v^2))`` (mup's ``l2``), and ``mean(|v|)`` cannot be recovered
    from it. ``l1`` holds the rms anyway, so that ``plot_coord_data``'s default ``y='l1'`` draws
    the check instead of empty panels: a coordinate check reads how a size scales with width,
    and ``mean|v| = c * rms(v)`` with a width-independent ``c`` whenever the shape of the
    coordinates' distribution does not change with width (``c = sqrt(2/pi)`` for Gaussian
    coordinates; ``c <= 1`` always), so the slopes agree. The numbers themselves are not mup's
    ``l1``: to compare or concatenate with a frame of ``get_coord_data``, record ``l2`` there
    (``output_fdict={'l2': 'l2'}``) and use ``y='l2'`` here. ``l1 == l2 == rms`` in every row.

    A value of ``None`` (the run diverged) becomes NaN in ``l1``, ``l2`` and ``rms``.

    Not included: ``get_coord_data``'s ``optimizer`` and ``lr`` columns (the records carry
    neither; the lr is in ``CoordCheckResult.settings``), and ``plot_coord_data`` reads neither.

    ``plot_coord_data`` lets seaborn average the rows sharing ``(width, module, t)`` (over seeds,
    with a confidence band), so rows of several rules or parametrizations in one frame are mixed
    into one curve: select one of each. Its ``name_contains`` is a regular expression matched
    anywhere, so ``"activation"`` also matches ``"activation_change"``: use ``"activation$"``
    (or select ``quantity`` here).

    Raises:
        ImportError: pandas is not installed.
        LocalLearningError: a record misses a key, has a step below 1, repeats another record's
            key, or no record matches the selection.
    """
    try:
        import pandas as pd
    except ImportError as error:  # pragma: no cover - pandas comes with mup
        raise ImportError(
            "coord_check_dataframe needs pandas. Fix: pip install pandas"
        ) from error

    selection = {"rule": rule, "parametrization": parametrization, "quantity": quantity}
    for index, record in enumerate(records):
        missing = [key for key in _KEYS if key not in record]
        if missing:
            raise LocalLearningError(
                f"record {index} has no {missing}; coord_check_dataframe needs the keys "
                f"{list(_KEYS)}. Fix: pass CoordCheckResult.records."
            )
    chosen = [
        r for r in records
        if all(want is None or r[key] == want for key, want in selection.items())
    ]
    if records and not chosen:
        wanted = {key: want for key, want in selection.items() if want is not None}
        available = {key: sorted({str(r[key]) for r in records}) for key in wanted}
        raise LocalLearningError(
            f"no record has {', '.join(f'{k}={v!r}' for k, v in wanted.items())}. "
            f"Fix: choose among {available}."
        )

    rows: list[dict[str, Any]] = []
    seen: set[tuple[Any, ...]] = set()
    for r in chosen:
        key = tuple(r[k] for k in _KEYS[:-1])
        if key in seen:
            raise LocalLearningError(
                f"two records share (rule, parametrization, width, seed, step, quantity, "
                f"layer) = {key}. Fix: pass each measurement once."
            )
        seen.add(key)
        step = int(r["step"])
        if step < 1:
            raise LocalLearningError(
                f"record {key} has step {step}; mup's t counts steps from 1. Fix: number the "
                "steps 1 .. k as coord_check does."
            )
        value = math.nan if r["value"] is None else float(r["value"])
        layer = int(r["layer"])
        rows.append({
            "width": int(r["width"]),
            "module": f"layer_{layer}" if quantity is not None
            else f"layer_{layer}:{r['quantity']}",
            "t": step,
            "l1": value,
            "l2": value,
            "rms": value,
            "seed": int(r["seed"]),
            "rule": str(r["rule"]),
            "parametrization": str(r["parametrization"]),
            "quantity": str(r["quantity"]),
            "layer": layer,
        })

    # Built like get_coord_data's frame (a DataFrame of dicts), so the string columns get the
    # dtype pandas gives mup's ``module``; the numeric ones are pinned (an all-None column of
    # values would otherwise be object, an empty frame object throughout).
    frame = pd.DataFrame(rows, columns=list(COLUMNS))
    ints = {"width": "int64", "t": "int64", "seed": "int64", "layer": "int64"}
    floats = {"l1": "float64", "l2": "float64", "rms": "float64"}
    frame = frame.astype({**ints, **floats})
    if not rows:
        text = pd.DataFrame([{"module": ""}])["module"].dtype
        frame = frame.astype({c: text for c in ("module", "rule", "parametrization",
                                                "quantity")})
    return frame
