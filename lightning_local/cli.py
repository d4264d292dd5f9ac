"""The ``lightning-local`` command.

``lightning-local fit|validate|test|predict`` is Lightning's ``LightningCLI`` over the
library's modules (any :class:`~lightning_local.modules.LocalLearningModule` subclass, chosen
by ``class_path`` in a YAML config) and data modules (MNIST-1D by default)::

    lightning-local fit --config examples/configs/pc_si_mup.yaml
    lightning-local fit --config examples/configs/bp_mup.yaml --model.init_args.lr 0.05

Other subcommands are plain functions ``main(argv) -> int`` looked up in :data:`SUBCOMMANDS`
(name -> ``"module:function"``, imported only when run). A module of the library adds its own
by one line in that table, or at run time with :func:`register_subcommand`.
"""

from __future__ import annotations

import importlib
import inspect
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = [
    "LIGHTNING_SUBCOMMANDS",
    "SUBCOMMANDS",
    "Subcommand",
    "main",
    "register_subcommand",
    "run_lightning_cli",
]

LIGHTNING_SUBCOMMANDS: dict[str, str] = {
    "fit": "train a model (--config a YAML file; see examples/configs/)",
    "validate": "run the validation set once (--ckpt_path to load weights)",
    "test": "run the test set once (--ckpt_path to load weights)",
    "predict": "write predictions of the predict set (--ckpt_path to load weights)",
}


@dataclass(frozen=True)
class Subcommand:
    """A subcommand implemented by ``target`` (``"package.module:function"``)."""

    target: str
    help: str

    def load(self) -> Callable[[list[str]], int | None]:
        module_name, _, function_name = self.target.partition(":")
        return getattr(importlib.import_module(module_name), function_name)


SUBCOMMANDS: dict[str, Subcommand] = {
    "quickstart": Subcommand(
        "lightning_local.quickstart:main",
        "train a muP predictive-coding MLP on MNIST-1D on the CPU and report its test accuracy",
    ),
    "sweep": Subcommand(
        "lightning_local.sweeps.cli:main",
        "width x learning-rate sweep: results.jsonl, transfer.png, best lr per width (resumes)",
    ),
    "coord-check": Subcommand(
        "lightning_local.diagnostics.coord_check:main",
        "per-layer rms sizes across widths after k steps, their slopes, JSON and plots",
    ),
}
"""Non-Lightning subcommands: name -> :class:`Subcommand`. Each target takes the remaining
arguments (a list of strings) and returns an exit code (``None`` means 0)."""


def register_subcommand(name: str, target: str, help: str) -> None:
    """Add (or replace) the subcommand ``name`` run by ``target`` = ``"module:function"``."""
    if name in LIGHTNING_SUBCOMMANDS:
        raise ValueError(f"{name!r} is a LightningCLI subcommand and cannot be replaced.")
    if ":" not in target:
        raise ValueError(f"target must read 'package.module:function', got {target!r}.")
    SUBCOMMANDS[name] = Subcommand(target, help)


def _lightning_cli_class() -> type:
    from lightning.pytorch.cli import LightningCLI

    class _LocalLearningCLI(LightningCLI):
        """``LightningCLI`` over the library's modules, MNIST-1D data by default, and a
        Trainer whose checkpoints are written atomically."""

        def _add_configure_optimizers_method_to_model(self, subcommand: str | None) -> None:
            """``--optimizer Adam --optimizer.lr 1e-3`` builds muP's per-role groups of that
            class (``lr`` is ``eta'``), and ``--lr_scheduler`` is built on them; LightningCLI
            alone would hand the optimizer ``model.parameters()`` in one group, an SP run."""
            import lightning.pytorch.cli as lightning_cli

            from lightning_local.modules import LocalLearningModule

            model = self.model
            if not isinstance(model, LocalLearningModule):
                return super()._add_configure_optimizers_method_to_model(subcommand)
            marker = object()
            real = lightning_cli.instantiate_class

            def instantiate(args: Any, init: dict[str, Any]) -> Any:
                if args is not marker:
                    return real(args, init)
                module_name, _, name = init["class_path"].rpartition(".")
                optimizer_class = getattr(importlib.import_module(module_name), name)
                options = dict(init.get("init_args", {}))
                defaults = inspect.signature(optimizer_class).parameters
                lr = options.pop("lr", defaults["lr"].default if "lr" in defaults else 1e-3)
                weight_decay = options.pop("weight_decay", 0.0)
                return model.local_run.make_optimizer(
                    optimizer_class, float(lr), float(weight_decay), **options
                )

            model.parameters = lambda *args, **kwargs: marker  # what the CLI hands its optimizer
            lightning_cli.instantiate_class = instantiate
            try:
                super()._add_configure_optimizers_method_to_model(subcommand)
            finally:
                lightning_cli.instantiate_class = real
                del model.parameters

        def instantiate_trainer(self, **kwargs: Any) -> Any:
            from lightning_local.modules.checkpoint import AtomicCheckpointIO

            trainer = super().instantiate_trainer(**kwargs)
            strategy = trainer.strategy
            if type(strategy.checkpoint_io).__name__ == "TorchCheckpointIO":
                strategy.checkpoint_io = AtomicCheckpointIO()
            return trainer

    return _LocalLearningCLI


def run_lightning_cli(args: Sequence[str] | None = None, run: bool = True, **kwargs: Any) -> Any:
    """Build (and by default run) the ``LightningCLI`` of ``lightning-local``.

    ``args`` as on the command line, e.g. ``["fit", "--config", "pc_si_mup.yaml"]``;
    ``run=False`` only instantiates (then ``args`` has no subcommand). Extra keyword arguments
    go to ``LightningCLI`` (e.g. ``trainer_defaults``).
    """
    import lightning as L

    from lightning_local.modules import LocalLearningModule
    from lightning_local.sweeps.components import make_current_folder_importable

    make_current_folder_importable()  # --model mymodule.MyModule from the current folder
    if args is not None:
        args = _with_default_data(list(args), subcommand=run)
    options: dict[str, Any] = dict(
        subclass_mode_model=True,
        subclass_mode_data=True,
        # never overwrite a previous run's config.yaml: LightningCLI stops and says how
        save_config_kwargs={"overwrite": False},
        parser_kwargs={"prog": "lightning-local"} if run else {},
    )
    options.update(kwargs)
    return _lightning_cli_class()(
        LocalLearningModule, L.LightningDataModule, args=args, run=run, **options
    )


DEFAULT_DATA = "lightning_local.data.MNIST1DDataModule"


def _with_default_data(args: list[str], subcommand: bool = True) -> list[str]:
    """``args`` with ``--data MNIST1DDataModule`` after the subcommand when neither the
    command line nor a ``--config`` file names a data module.

    The default is added only then, so a user's own data module keeps its own defaults
    (a parser-wide default would carry MNIST-1D's batch size and seed over to it).
    """
    if subcommand and (not args or args[0] not in LIGHTNING_SUBCOMMANDS):
        return args
    if any(a == "--data" or a.startswith("--data=") for a in args):
        return args
    for index, arg in enumerate(args):
        path = None
        if arg == "--config" and index + 1 < len(args):
            path = args[index + 1]
        elif arg.startswith("--config="):
            path = arg.split("=", 1)[1]
        if path and _config_names_data(path):
            return args
    if not subcommand:  # run=False: no subcommand in front
        return ["--data", DEFAULT_DATA, *args]
    return [args[0], "--data", DEFAULT_DATA, *args[1:]]


def _config_names_data(path: str) -> bool:
    import yaml

    try:
        with open(path) as handle:
            config = yaml.safe_load(handle) or {}
    except (OSError, yaml.YAMLError):
        return False  # LightningCLI reports the file itself
    return isinstance(config, dict) and bool(config.get("data"))


def _usage() -> str:
    width = max(len(name) for name in [*LIGHTNING_SUBCOMMANDS, *SUBCOMMANDS])
    lines = [
        "usage: lightning-local <command> [options]",
        "",
        "Local learning rules (predictive coding, target propagation) with muP for Lightning.",
        "",
        "Lightning commands (LightningCLI; `lightning-local fit --help` lists every option):",
    ]
    lines += [f"  {name:<{width}}  {text}" for name, text in LIGHTNING_SUBCOMMANDS.items()]
    lines += ["", "Other commands (`lightning-local <command> --help`):"]
    lines += [f"  {name:<{width}}  {command.help}" for name, command in sorted(SUBCOMMANDS.items())]
    lines += [
        "",
        "examples:",
        "  lightning-local quickstart",
        "  lightning-local fit --config examples/configs/pc_si_mup.yaml",
        "  lightning-local fit --config examples/configs/bp_sp.yaml --trainer.max_epochs 3",
    ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``lightning-local`` console script; returns the exit code."""
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    command, rest = args[0], args[1:]
    if command in ("-V", "--version"):
        from importlib.metadata import version

        print(f"lightning-local {version('lightning-local')}")
        return 0
    if command not in LIGHTNING_SUBCOMMANDS and command not in SUBCOMMANDS:
        print(f"lightning-local: unknown command {command!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    from lightning_local.errors import LocalLearningError

    try:
        if command in LIGHTNING_SUBCOMMANDS:
            # the arguments go in explicitly; an empty sys.argv keeps LightningCLI from warning
            # that both were given
            saved, sys.argv = sys.argv, sys.argv[:1]
            try:
                run_lightning_cli([command, *rest])
            except RuntimeError as error:  # LightningCLI refusing to overwrite a config.yaml
                if "overwrit" not in str(error):
                    raise
                print(f"lightning-local {command}: {error}", file=sys.stderr)
                return 1
            finally:
                sys.argv = saved
            return 0
        code = SUBCOMMANDS[command].load()(rest)
    except LocalLearningError as error:  # a user mistake or a diverged run: the message says why
        print(f"lightning-local {command}: {type(error).__name__}: {error}", file=sys.stderr)
        return 1
    return 0 if code is None else int(code)


if __name__ == "__main__":
    sys.exit(main())
