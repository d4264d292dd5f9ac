"""Coordinate checks for local rules: does every layer's size stay put as the width grows?

For each rule and parametrization, a network of each width takes ``steps`` training steps (the
same data, the same lr ``eta'``) and after each step ``t`` the rms size of these quantities is
recorded per layer ``l`` (``rms(v) = sqrt(mean(v^2))`` over batch and features):

==================  ==========================================================================
``activation``      ``h_l(t)``, block ``l``'s feedforward output on a fixed probe batch
``activation_change``  ``h_l(t) - h_l(0)``, the feature change since initialization
``weight_update``   ``f_l(h_{l-1}; W_l(t)) - f_l(h_{l-1}; W_l(t-1))`` at step ``t-1``'s probe
                    inputs: what step ``t``'s own weight change does to the layer's output
                    (``Delta W_l h_{l-1}`` for a linear block)
``state``           PC: the value nodes ``x_l`` after inference on step ``t``'s batch
``error``           PC: ``eps_l = x_l - mu_l`` as the weight update uses it (hidden) and
                    ``eps_L = -d loss/d mu_L``
``target``          TP/DTP: the targets ``tau_l`` of step ``t``'s batch
``target_change``   TP/DTP: ``tau_l - h_l``, how far the targets pull each layer
==================  ==========================================================================

The fitted slope of ``log rms`` against ``log width`` (least squares, ``numpy.polyfit``) says
how a quantity scales: about 0 means width-independent (what muP promises for activations,
their changes and the updates), a positive slope means it blows up with width (SP's readout:
``Delta W_L h_{L-1} ~ M``), a negative one that it vanishes. Backward quantities carry their
own scale: PC's hidden errors equal ``-gamma_L dL/dh_l`` under SI with FPA, which is
``Theta(1/M)`` per coordinate under muP and ``Theta(M^{-1/2})`` under SP, like backprop's
gradients; the learning rates of the tables turn them into ``Theta(1)`` updates.

Layers are numbered ``1 .. L`` (``L`` is the readout). The measurements themselves are the
pure functions of :mod:`lightning_local.diagnostics.measures`; the figures come from
:mod:`lightning_local.diagnostics.plots`, and ``coord_check.json``/``coord_check.md`` are written
atomically (:mod:`lightning_local._atomic`).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor

from lightning_local._atomic import atomic_write_text
from lightning_local.diagnostics.measures import (
    fit_slope,
    forward_rms,
    pc_rms,
    rms,
    snapshot,
    tp_rms,
    weight_update_rms,
)
from lightning_local.errors import LocalLearningError, NonFiniteEnergyError
from lightning_local.network import as_blocks
from lightning_local.rules.predictive_coding import PredictiveCoding
from lightning_local.sweeps.components import DataSpec, ModelSpec
from lightning_local.sweeps.experiment import build_experiment, load_dataset, parse_variant

if TYPE_CHECKING:
    import pandas
    from lightning.pytorch.loggers import Logger

__all__ = [
    "QUANTITIES",
    "CoordCheckResult",
    "coord_check",
    "main",
    "variant_family",
]

QUANTITIES = (
    "activation", "activation_change", "weight_update", "state", "error", "target",
    "target_change",
)


# ------------------------------------------------------------------------- the check
@dataclass
class CoordCheckResult:
    """Per-layer rms sizes and their slopes against width.

    Attributes:
        records: ``{rule, parametrization, width, seed, step, quantity, layer, value}``
            (``value`` is ``None`` after a divergence).
        slopes: ``{rule, parametrization, quantity, layer, step, slope}``, the slope of
            ``log value`` (mean over seeds) against ``log width``.
        settings: the arguments of the check.
    """

    records: list[dict[str, Any]]
    slopes: list[dict[str, Any]]
    settings: dict[str, Any] = field(default_factory=dict)

    def slope(self, rule: str, parametrization: str, quantity: str, layer: int,
              step: int | None = None) -> float | None:
        """The fitted slope of one quantity (at the last step by default)."""
        step = self.last_step if step is None else step
        for s in self.slopes:
            if (s["rule"], s["parametrization"], s["quantity"], s["layer"], s["step"]) == (
                rule, parametrization, quantity, layer, step
            ):
                return s["slope"]
        raise LocalLearningError(
            f"no slope for {rule}/{parametrization}/{quantity}/layer {layer}/step {step}."
        )

    @property
    def last_step(self) -> int:
        return max(s["step"] for s in self.slopes)

    def table(self, step: int | None = None) -> str:
        """Markdown table of the slopes (one row per rule, parametrization and quantity)."""
        step = self.last_step if step is None else step
        chosen = [s for s in self.slopes if s["step"] == step]
        layers = sorted({s["layer"] for s in chosen})
        rows: dict[tuple, dict[int, float | None]] = defaultdict(dict)
        for s in chosen:
            rows[s["rule"], s["parametrization"], s["quantity"]][s["layer"]] = s["slope"]
        lines = [
            f"Slope of log rms against log width after step {step}",
            "",
            "| rule | param | quantity | " + " | ".join(f"layer {l}" for l in layers) + " |",
            "|" + "---|" * (len(layers) + 3),
        ]
        for (rule, param, quantity), by_layer in rows.items():
            cells = [
                "" if l not in by_layer else _format_slope(by_layer[l]) for l in layers
            ]
            lines.append(f"| {rule} | {param} | {quantity} | " + " | ".join(cells) + " |")
        return "\n".join(lines)

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write records, slopes and settings as one JSON file (atomically)."""
        text = json.dumps(asdict(self), indent=1, allow_nan=False) + "\n"
        return atomic_write_text(path, text)

    def to_dataframe(
        self,
        *,
        rule: str | None = None,
        parametrization: str | None = None,
        quantity: str | None = None,
    ) -> pandas.DataFrame:
        """The records as a ``pandas.DataFrame`` in ``mup.coord_check``'s format (columns
        ``width``, ``module``, ``t``, ``l1``, ...), for ``mup.coord_check.plot_coord_data``;
        see :func:`lightning_local.diagnostics.mup_format.coord_check_dataframe`."""
        from lightning_local.diagnostics.mup_format import coord_check_dataframe

        return coord_check_dataframe(
            self.records, rule=rule, parametrization=parametrization, quantity=quantity
        )

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> CoordCheckResult:
        """Read a file written by :meth:`save`."""
        return cls(**json.loads(Path(path).read_text(encoding="utf-8")))


def _format_slope(slope: float | None) -> str:
    return "n/a" if slope is None else f"{slope:+.2f}"


def _measure_run(
    variant: str, parametrization: str, width: int, seed: int, data: tuple[Tensor, ...],
    steps: int, lr: float, batch_size: int, probe_size: int, build: Mapping[str, Any],
) -> list[dict[str, Any]]:
    x_train, y_train, x_test, _ = data
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        experiment = build_experiment(
            variant, parametrization, width, lr, in_features=int(x_train[0].numel()),
            num_classes=int(y_train.max()) + 1, **build,
        )
        network, rule = experiment.network, experiment.rule
        blocks = as_blocks(network)
        order = torch.randperm(x_train.shape[0], generator=torch.Generator().manual_seed(seed))
        probe = x_test[:probe_size]
        initial, _ = forward_rms(blocks, probe)
        previous = initial
        records: list[dict[str, Any]] = []

        def add(step: int, quantity: str, values: Iterable[float | None], first: int = 1) -> None:
            for layer, value in enumerate(values, start=first):
                ok = value is not None and math.isfinite(value)
                records.append(dict(
                    rule=variant, parametrization=parametrization, width=width, seed=seed,
                    step=step, quantity=quantity, layer=layer, value=value if ok else None,
                ))

        for step in range(1, steps + 1):
            index = order[((step - 1) * batch_size + torch.arange(batch_size)) % len(order)]
            inputs, targets = x_train[index], y_train[index]
            try:
                if isinstance(rule, PredictiveCoding):
                    for quantity, values in pc_rms(rule, network, inputs, targets).items():
                        add(step, quantity, values)
                before = snapshot(blocks)
                result = rule.step(network, inputs, targets, experiment.optimizer)
                if variant_family(variant) == "tp":
                    for quantity, values in tp_rms(result, previous).items():
                        add(step, quantity, values)
                activations, sizes = forward_rms(blocks, probe)
                add(step, "activation", sizes)
                add(step, "activation_change",
                    [float(rms(h - h0)) for h, h0 in zip(activations[1:], initial[1:])])
                add(step, "weight_update", weight_update_rms(blocks, before, previous[:-1]))
                previous = activations
            except (NonFiniteEnergyError, torch.linalg.LinAlgError):
                break  # diverged: the remaining steps have no values, the slope skips them
    return records


def variant_family(variant: str) -> str:
    """``"bp"``, ``"pc"`` or ``"tp"`` for a rule variant name."""
    return parse_variant(variant).family


def _slopes(records: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    grouped: dict[tuple, dict[int, list[float | None]]] = defaultdict(lambda: defaultdict(list))
    for r in records:
        key = (r["rule"], r["parametrization"], r["quantity"], r["layer"], r["step"])
        grouped[key][r["width"]].append(r["value"])
    slopes = []
    for (rule, param, quantity, layer, step), by_width in grouped.items():
        widths = sorted(by_width)
        means = [
            None if any(v is None for v in by_width[w]) else float(np.mean(by_width[w]))
            for w in widths
        ]
        slopes.append(dict(rule=rule, parametrization=param, quantity=quantity, layer=layer,
                           step=step, slope=fit_slope(widths, means)))
    return slopes


def coord_check(
    rules: Sequence[str] = ("bp", "pc-si-fpa", "pc-si", "pc-sim", "dtp"),
    parametrizations: Sequence[str] = ("sp", "mup"),
    widths: Sequence[int] = (64, 128, 256, 512, 1024),
    *,
    steps: int = 3,
    lr: float = 0.1,
    seeds: Sequence[int] = (0,),
    batch_size: int = 128,
    probe_size: int = 256,
    dataset: str = "mnist1d",
    data_dir: str | None = None,
    num_samples: int = 5000,
    base_width: int | None = None,
    depth: int = 3,
    activation: str = "tanh",
    bias: bool = False,
    loss: str = "mse",
    output_weight_exponent: float = 0.0,
    zero_readout: bool = False,
    model: Any = None,
    data: Any = None,
    optimizer: str = "sgd",
    output: str | os.PathLike[str] | None = None,
    log: Any = None,
    log_to: Logger | Iterable[Logger] | None = None,
) -> CoordCheckResult:
    """Run the coordinate check; with ``output`` also write ``coord_check.json``,
    ``coord_check.md`` (the slope table) and ``coord_check_<rule>.png`` per rule.

    Args:
        rules: rule variants (see :mod:`lightning_local.sweeps.experiment`).
        parametrizations: ``"sp"`` and/or ``"mup"``.
        widths: hidden widths; ``base_width`` defaults to the smallest.
        steps: training steps ``k``; quantities are recorded after each of steps ``1 .. k``.
        lr: the learning rate ``eta'`` (the same for every width).
        seeds: init and batch-order seeds; the slope is fitted to the mean over seeds.
        batch_size: training batch size; ``probe_size``: test inputs the activations are
            measured on.
        dataset, data_dir: the data (``"mnist1d"`` or ``"fashion-mnist"``); ``num_samples``
            is MNIST-1D's size.
        depth, activation, bias, loss: the MLP and its loss (the paper's defaults).
        output_weight_exponent: muP's ``g`` for PC.
        zero_readout: start the readout's weights at 0 (``mup``'s ``readout_zero_init``).
            With the paper's random readout, muP's output starts at ``Theta(M^{-1/2})``, and
            its random backward path adds a part to the updates that shrinks like
            ``M^{-1/2}``: over widths 64 .. 1024 that reads as slopes of about -0.3 to -0.4
            for BP and PC. A zero readout removes it and leaves the muP limit's flat slopes.
        model, data: the user's network at each width and data, as for a sweep
            (:class:`lightning_local.sweeps.SweepConfig`,
            :mod:`lightning_local.sweeps.components`); ``None``: the built-in MLP and
            ``dataset``.
        optimizer: ``"sgd"``, ``"adam"`` or ``"adamw"``.
        output: folder for the JSON, the slope table and the figures.
        log: a callable receiving progress lines (``None``: silent).
        log_to: Lightning loggers that get the settings as hyperparameters and, the
            ``WandbLogger`` among them, the slopes at the last step as the table
            ``tables/coord_check_slopes`` and (with ``output``) each rule's figure as the image
            ``figures/coord_check/<rule>`` (see :mod:`lightning_local.diagnostics.loggers`).
    """
    widths = sorted(int(w) for w in widths)
    if len(widths) < 2:
        raise LocalLearningError("a coordinate check needs at least two widths. Fix: e.g. "
                                 "widths=(64, 128, 256).")
    if steps < 1:
        raise LocalLearningError(f"steps must be >= 1, got {steps}.")
    settings = dict(
        rules=list(rules), parametrizations=list(parametrizations), widths=widths, steps=steps,
        lr=lr, seeds=list(seeds), batch_size=batch_size, probe_size=probe_size,
        dataset=dataset, num_samples=num_samples, base_width=base_width or widths[0],
        depth=depth,
        activation=activation, bias=bias, loss=loss,
        output_weight_exponent=output_weight_exponent, zero_readout=zero_readout,
    )
    model_spec, data_spec = ModelSpec.of(model), DataSpec.of(data)
    if model_spec is not None:
        settings["model"] = model_spec.to_dict()
    if data_spec is not None:
        settings["data"] = data_spec.to_dict()
    if optimizer != "sgd":
        settings["optimizer"] = optimizer
    data = load_dataset(dataset, data_dir, num_samples, data=data_spec)
    build = dict(base_width=base_width or widths[0], depth=depth, activation=activation,
                 bias=bias, loss=loss, output_weight_exponent=output_weight_exponent,
                 zero_readout=zero_readout, model=model_spec, optimizer=optimizer)
    records: list[dict[str, Any]] = []
    for rule in rules:
        name = parse_variant(rule).name
        for param in parametrizations:
            for width in widths:
                for seed in seeds:
                    records += _measure_run(name, param, width, seed, data, steps, lr,
                                            batch_size, probe_size, build)
            if log is not None:
                log(f"coord-check: {name} {param} done")
    result = CoordCheckResult(records, _slopes(records), settings)
    figures = {} if output is None else _write(result, Path(output))
    if log_to is not None:
        _log(log_to, result, figures)
    return result


def _write(result: CoordCheckResult, folder: Path) -> dict[str, Path]:
    """Write the JSON, the slope table and one figure per rule; return ``{rule: figure}``."""
    from lightning_local.diagnostics.plots import plot_coord_check

    folder.mkdir(parents=True, exist_ok=True)
    result.save(folder / "coord_check.json")
    atomic_write_text(folder / "coord_check.md", result.table() + "\n")
    figures = {}
    for rule in dict.fromkeys(r["rule"] for r in result.records):
        safe = "".join(c if c.isalnum() or c in "-_" else "_" for c in rule)
        figures[rule] = plot_coord_check(result.records, result.slopes,
                                         folder / f"coord_check_{safe}.png", rule)
    return figures


def _log(
    loggers: Logger | Iterable[Logger], result: CoordCheckResult, figures: Mapping[str, Path]
) -> None:
    from lightning.pytorch.loggers import Logger

    from lightning_local.diagnostics.loggers import log_figure, log_table

    loggers = [loggers] if isinstance(loggers, Logger) else list(loggers)
    for logger in loggers:
        logger.log_hyperparams(result.settings)
    for rule, path in figures.items():
        log_figure(loggers, f"figures/coord_check/{rule}", path)
    log_table(loggers, "tables/coord_check_slopes",
              [s for s in result.slopes if s["step"] == result.last_step])


def main(argv: Sequence[str] | None = None) -> int:
    """``lightning-local coord-check``: run :func:`coord_check` from the command line.

    ``--wandb`` also logs the arguments, the figures and the slope table to an offline W&B run
    in ``<output>/wandb/``.
    """
    from lightning_local.diagnostics.loggers import add_wandb_arguments, command_wandb_run
    from lightning_local.sweeps.config_file import apply_config_file

    parser = argparse.ArgumentParser(
        prog="lightning-local coord-check",
        description="Per-layer rms sizes (activations, PC states/errors, TP targets, weight "
        "updates) after steps 1..k across widths, their slopes against width, JSON and plots.",
    )
    parser.add_argument("--config", default=None,
                        help="YAML file of these options plus model and data "
                        "(class_path/init_args); command-line options override it")
    parser.add_argument("--rules", nargs="+", default=["bp", "pc-si-fpa", "pc-si", "pc-sim",
                                                       "dtp"],
                        help="rule variants: bp, pc-si-fpa, pc-si, pc-sim, dtp, tp "
                             "(overrides: 'pc-sim:inference_steps=16')")
    parser.add_argument("--parametrizations", nargs="+", default=["sp", "mup"])
    parser.add_argument("--widths", nargs="+", type=int, default=[64, 128, 256, 512, 1024])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--dataset", default="mnist1d", choices=["mnist1d", "fashion-mnist"])
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--num-samples", type=int, default=5000, help="MNIST-1D size")
    parser.add_argument("--base-width", type=int, default=None)
    parser.add_argument("--output-weight-exponent", type=float, default=0.0)
    parser.add_argument("--zero-readout", action="store_true",
                        help="start the readout's weights at 0 (mup's readout_zero_init)")
    parser.add_argument("--output", default="coord_check", help="output folder")
    add_wandb_arguments(parser)
    try:
        extra = apply_config_file(parser, argv, ("model", "data", "optimizer", "loss", "depth",
                                                 "activation", "bias", "probe_size"))
    except LocalLearningError as error:
        print(f"lightning-local coord-check: {error}", file=sys.stderr)
        return 2
    args = parser.parse_args(list(argv) if argv is not None else None)
    try:
        with command_wandb_run(args, f"coord-check-{Path(args.output).name}",
                               args.output) as log_to:
            result = coord_check(
                args.rules, args.parametrizations, args.widths, steps=args.steps, lr=args.lr,
                seeds=args.seeds, batch_size=args.batch_size, dataset=args.dataset,
                data_dir=args.data_dir, num_samples=args.num_samples,
                base_width=args.base_width, output_weight_exponent=args.output_weight_exponent,
                zero_readout=args.zero_readout, output=args.output, **extra,
                log=lambda line: print(line, file=sys.stderr, flush=True), log_to=log_to,
            )
    except LocalLearningError as error:
        print(f"lightning-local coord-check: {error}", file=sys.stderr)
        return 2
    print(result.table())
    print(f"\nwrote {Path(args.output) / 'coord_check.json'} and the figures", file=sys.stderr)
    return 0

