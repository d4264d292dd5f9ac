"""The ``lightning-local`` command: dispatch, every example config, the quickstart."""

from __future__ import annotations

import re
import sys
import types
from pathlib import Path

import pytest
import torch
import yaml

from lightning_local import cli
from lightning_local.data import MNIST1DDataModule
from lightning_local.models import MLP
from lightning_local.modules import BackpropModule, PredictiveCodingModule

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "examples" / "configs").glob("*.yaml"))
OWN_CONFIGS = ["bp_sp", "bp_mup", "pc_si_sp", "pc_si_mup", "pc_t_sp", "pc_t_mup"]
QUIET = ["--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]


def _small_data(data_dir: str) -> list[str]:
    return ["--data.init_args.data_dir", data_dir, "--data.init_args.num_samples", "300"]


def test_help_lists_every_command(capsys):
    assert cli.main(["--help"]) == 0
    text = capsys.readouterr().out
    for name in [*cli.LIGHTNING_SUBCOMMANDS, *cli.SUBCOMMANDS]:
        assert re.search(rf"^  {re.escape(name)}\s", text, re.MULTILINE), name
    assert "examples/configs" in text


def test_unknown_command_fails_with_usage(capsys):
    assert cli.main(["trian"]) == 2
    assert "unknown command 'trian'" in capsys.readouterr().err


def test_registered_subcommand_receives_its_arguments(monkeypatch):
    calls = []
    plugin = types.ModuleType("_lightning_local_test_plugin")
    plugin.main = lambda argv: calls.append(argv) or 3
    monkeypatch.setitem(sys.modules, plugin.__name__, plugin)
    monkeypatch.setattr(cli, "SUBCOMMANDS", dict(cli.SUBCOMMANDS))
    cli.register_subcommand("echo", f"{plugin.__name__}:main", "test command")
    assert cli.main(["echo", "--flag", "1"]) == 3
    assert calls == [["--flag", "1"]]
    with pytest.raises(ValueError):
        cli.register_subcommand("fit", f"{plugin.__name__}:main", "shadowing")


def test_all_own_example_configs_exist():
    assert {path.stem for path in CONFIGS} >= set(OWN_CONFIGS)


@pytest.mark.parametrize("name", OWN_CONFIGS)
def test_example_config_fits(name, data_dir, tmp_path):
    """Each config parses, builds what it says and trains one step (fast_dev_run)."""
    path = next(p for p in CONFIGS if p.stem == name)
    config = yaml.safe_load(path.read_text())["model"]
    result = cli.run_lightning_cli(
        ["fit", "--config", str(path), "--trainer.fast_dev_run", "true",
         "--trainer.default_root_dir", str(tmp_path), *_small_data(data_dir), *QUIET]
    )
    model = result.model
    assert type(model).__name__ == config["class_path"].rsplit(".", 1)[1]
    settings = config["init_args"]
    assert model.parametrization.name == settings["parametrization"]
    assert model.lr == settings["lr"]
    assert isinstance(model.network, MLP)
    assert model.network.width == settings["network"]["init_args"]["width"]
    assert isinstance(result.datamodule, MNIST1DDataModule)
    assert result.trainer.global_step == 1
    if isinstance(model, PredictiveCodingModule):
        assert model.rule.inference == settings["inference"]
        assert model.rule.inference_steps == settings["inference_steps"]
        assert float(result.trainer.callback_metrics["train/inference_steps"]) == (
            1 if settings["inference"] == "sequential" else settings["inference_steps"]
        )
    if settings["parametrization"] == "mup":
        weight = model.network[1][0].weight
        assert weight.infshape.width_mult() == pytest.approx(512 / settings["base_width"])


def test_fit_then_test_from_checkpoint_with_default_data(data_dir, tmp_path):
    """No data section: MNIST-1D is the default; `test --ckpt_path` reloads the fitted run."""
    model_args = ["--model", "PredictiveCodingModule", "--model.parametrization", "mup",
                  "--model.network", "lightning_local.models.MLP",
                  "--model.network.width", "32", "--model.base_width", "16"]
    data_args = ["--data.data_dir", data_dir, "--data.num_samples", "300"]
    fitted = cli.run_lightning_cli(
        ["fit", *model_args, *data_args, *QUIET, "--trainer.max_steps", "3",
         "--trainer.limit_val_batches", "1", "--trainer.default_root_dir", str(tmp_path)]
    )
    checkpoint = fitted.trainer.checkpoint_callback.best_model_path
    assert Path(checkpoint).is_file()
    assert (Path(fitted.trainer.log_dir) / "config.yaml").is_file()
    tested = cli.run_lightning_cli(
        ["test", *model_args, *data_args, *QUIET, "--ckpt_path", checkpoint,
         "--trainer.default_root_dir", str(tmp_path / "test")]
    )
    reference = PredictiveCodingModule.load_from_checkpoint(checkpoint)
    x, y = tested.datamodule.test_set.tensors
    with torch.no_grad():
        accuracy = float((reference(x).argmax(1) == y).float().mean())
    assert float(tested.trainer.callback_metrics["test/acc"]) == pytest.approx(accuracy)


def _quickstart(capsys, *args: str) -> tuple[int, str, str]:
    code = cli.main(["quickstart", "--no-progress-bar", *args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_quickstart_reports_accuracy_and_paths(data_dir, tmp_path, capsys):
    code, out, _ = _quickstart(
        capsys, "--epochs", "2", "--width", "32", "--num-samples", "500",
        "--data-dir", data_dir, "--out", str(tmp_path),
    )
    assert code == 0
    accuracy = float(re.search(r"test accuracy: ([0-9.]+)", out).group(1))
    log_dir = Path(re.search(r"logs:\s+(\S+)", out).group(1))
    best = Path(re.search(r"checkpoint:\s+(\S+) \(best", out).group(1))
    last = Path(re.search(r"\s(\S+) \(last\)", out).group(1))
    assert log_dir.is_relative_to(tmp_path / "quickstart") and (log_dir / "metrics.csv").is_file()
    assert best.is_file() and last.name == "last.ckpt" and last.is_file()
    # the printed accuracy is the best checkpoint's accuracy on the test split
    model = PredictiveCodingModule.load_from_checkpoint(best)
    assert model.parametrization.name == "mup" and model.network.width == 32
    data = MNIST1DDataModule(data_dir=data_dir, num_samples=500)
    data.setup("test")
    x, y = data.test_set.tensors
    with torch.no_grad():
        expected = float((model(x).argmax(1) == y).float().mean())
    assert accuracy == pytest.approx(expected, abs=1e-4)


def test_quickstart_backprop_sp_and_divergence_hint(data_dir, tmp_path, capsys):
    common = ("--width", "16", "--num-samples", "300", "--data-dir", data_dir,
              "--out", str(tmp_path), "--parametrization", "sp")
    code, out, _ = _quickstart(capsys, "--rule", "bp", "--epochs", "1", *common)
    assert code == 0 and "backprop, sp" in out
    best = re.search(r"checkpoint:\s+(\S+) \(best", out).group(1)
    assert isinstance(BackpropModule.load_from_checkpoint(best), BackpropModule)
    code, _, err = _quickstart(capsys, "--lr", "1e12", "--epochs", "3", *common)
    assert code == 1
    assert "diverged" in err and "--parametrization mup" in err


def test_quickstart_logs_offline_to_wandb(data_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    code, out, _ = _quickstart(
        capsys, "--wandb", "--epochs", "1", "--width", "16", "--num-samples", "300",
        "--data-dir", data_dir, "--out", str(tmp_path),
    )
    assert code == 0
    run_dir = Path(re.search(r"logs:\s+(\S+)", out).group(1))
    assert run_dir.name.startswith("offline-run-") and run_dir.is_relative_to(tmp_path)
    assert list(run_dir.glob("*.wandb")), "no offline wandb log was written"


USER_MODULE = '''
import lightning as L
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_local.modules import PredictiveCodingModule


class MyData(L.LightningDataModule):
    def __init__(self, batch_size: int = 64, seed: int = 0) -> None:
        super().__init__()
        self.save_hyperparameters()

    def train_dataloader(self):
        generator = torch.Generator().manual_seed(self.hparams.seed)
        x = torch.randn(96, 6, generator=generator)
        return DataLoader(TensorDataset(x, (x[:, 0] > 0).long()),
                          batch_size=self.hparams.batch_size)


class MyModule(PredictiveCodingModule):
    def __init__(self, width: int = 16, lr: float = 0.1) -> None:
        super().__init__(lr=lr, loss="cross_entropy")
        self.net = nn.Sequential(nn.Linear(6, width), nn.Tanh(), nn.Linear(width, 2))
'''


def test_fit_own_classes_from_the_current_folder_keeps_their_defaults(tmp_path, monkeypatch):
    """`--model mymod.MyModule --data mymod.MyData` from the folder holding mymod.py, without
    PYTHONPATH; the data module keeps its own defaults (not MNIST-1D's batch size and seed)."""
    (tmp_path / "usermod_cli.py").write_text(USER_MODULE)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    monkeypatch.delitem(sys.modules, "usermod_cli", raising=False)
    fitted = cli.run_lightning_cli(
        ["fit", "--model", "usermod_cli.MyModule", "--data", "usermod_cli.MyData", *QUIET,
         "--trainer.max_steps", "2", "--trainer.default_root_dir", str(tmp_path)]
    )
    assert type(fitted.model).__name__ == "MyModule"
    hparams = fitted.datamodule.hparams
    assert (hparams["batch_size"], hparams["seed"]) == (64, 0)
    assert fitted.trainer.global_step == 2
    assert fitted.model.network_for_rule() is fitted.model.net
    sys.modules.pop("usermod_cli", None)


def _cli_optimizer(width: int, *optimizer: str, module: str = "PredictiveCodingModule"):
    built = cli.run_lightning_cli(
        ["--model", module, "--model.parametrization", "mup",
         "--model.network", "lightning_local.models.MLP", "--model.network.width", str(width),
         "--model.base_width", "16", *optimizer],
        run=False,
    )
    return built.model.configure_optimizers()


@pytest.mark.parametrize(("module", "rule"), [("BackpropModule", "bp"),
                                              ("PredictiveCodingModule", "pc"),
                                              ("TargetPropagationModule", "tp")])
def test_cli_optimizer_gets_mups_groups_with_the_tables_exponents(module, rule):
    """`--optimizer Adam --optimizer.lr 1e-3`: per-role lr = 1e-3 m^-c with c from muP's Adam
    table of the rule (fitted across widths), not one SP group."""
    import math

    from lightning_local.parametrization import MuP

    widths = (32, 64, 128)
    lrs = []
    for width in widths:
        configured = _cli_optimizer(width, "--optimizer", "Adam", "--optimizer.lr", "0.001",
                                    "--optimizer.betas", "[0.8, 0.9]", module=module)
        optimizer = configured[0][0] if isinstance(configured, tuple) else configured
        optimizer = optimizer[0] if isinstance(optimizer, list) else optimizer
        assert isinstance(optimizer, torch.optim.Adam)
        assert all(g["betas"] == (0.8, 0.9) for g in optimizer.param_groups)
        lrs.append({g["role"]: g["lr"] for g in optimizer.param_groups})
    table = MuP().exponents(rule, "adam")
    for role in lrs[0]:
        slope = (math.log(lrs[-1][role]) - math.log(lrs[0][role])) / math.log(
            widths[-1] / widths[0])
        assert slope == pytest.approx(-table[role].lr, abs=1e-9), role
        assert lrs[0][role] == pytest.approx(1e-3 * 2.0 ** -table[role].lr)  # m = 2 at 32


def test_cli_optimizer_the_tables_do_not_cover_is_refused():
    from lightning_local.errors import LocalLearningError

    with pytest.raises(LocalLearningError, match="RMSprop"):
        _cli_optimizer(32, "--optimizer", "RMSprop", "--optimizer.lr", "0.001")


def test_fit_twice_into_one_folder_keeps_the_first_config(data_dir, tmp_path, monkeypatch, capsys):
    """The console command neither warns about `args` nor overwrites a run's config.yaml."""
    import warnings

    args = ["fit", "--model", "BackpropModule", "--model.network", "lightning_local.models.MLP",
            "--model.network.width", "16", *QUIET, "--trainer.max_steps", "1",
            "--trainer.logger", "false", "--trainer.enable_checkpointing", "false",
            "--trainer.default_root_dir", str(tmp_path), *_small_data(data_dir)]
    monkeypatch.setattr(sys, "argv", ["lightning-local", *args])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert cli.main(args) == 0
    assert not [w for w in caught if "args" in str(w.message) and "command line" in str(w.message)]
    config = tmp_path / "config.yaml"
    first = config.read_text()
    capsys.readouterr()
    assert cli.main([*args, "--model.network.width", "32"]) == 1
    assert "config.yaml" in capsys.readouterr().err
    assert config.read_text() == first
