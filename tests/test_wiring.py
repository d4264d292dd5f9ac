"""Settings are declared once: signatures, hparams, YAML, checkpoints, the CLI, run keys, wire.

Every rule declares its settings as a frozen dataclass (``Rule.Settings``); the Lightning
modules' signatures, ``hparams``, checkpoints, ``LightningCLI`` and the sweep's run keys are
derived from those declarations, and :func:`lightning_local.wiring.wire` is the one seam that
wires a run. These tests enumerate the settings from the dataclasses, never from a hand list.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import json
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
import yaml
from lightning.pytorch.core.saving import load_hparams_from_yaml, save_hparams_to_yaml
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import lightning_local
from lightning_local import modules as modules_package
from lightning_local.cli import run_lightning_cli
from lightning_local.errors import LocalLearningError, MissingBaseShapesError
from lightning_local.models import MLP
from lightning_local.modules import (
    BackpropModule,
    LocalLearningModule,
    PredictiveCodingModule,
    TargetPropagationModule,
)
from lightning_local.parametrization import set_base_shapes
from lightning_local.rules import RULES, PredictiveCoding, get_rule_class
from lightning_local.sweeps.experiment import RULE_VARIANTS, RuleVariant, parse_variant
from lightning_local.sweeps.results import run_key
from lightning_local.sweeps.runner import SweepConfig
from lightning_local.wiring import TrainingSettings, wire

QUIET = ["--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]

# The network of the round trips: MNIST-1D's 40 inputs and 10 classes (the CLI's default data),
# 3 weight layers = 3 blocks = 2 hidden layers.
IN, CLASSES, DEPTH, WIDTH = 40, 10, 3, 12
NETWORK = dict(in_features=IN, width=WIDTH, num_classes=CLASSES, depth=DEPTH)

# Every preset module: one per registered rule (checked below, so a new rule needs a preset).
PRESETS = sorted(
    (
        obj
        for obj in vars(modules_package).values()
        if isinstance(obj, type) and issubclass(obj, LocalLearningModule)
        and obj is not LocalLearningModule
    ),
    key=lambda cls: cls.__name__,
)

_BASE_SHAPES = object()  # placeholder: a .bsh file written for the module's network

# A valid non-default value for EVERY declared setting, by field name; all of one module's
# values are valid together (TP: nonlinear feedback and several feedback steps need noisy
# feedback training, which pre-training needs too; muP reads its base shapes from the file).
NON_DEFAULT: dict[str, Any] = {
    # PredictiveCodingSettings
    "inference": "simultaneous",
    "inference_steps": 2,
    "inference_lr": [0.5, 0.25],  # one per hidden layer
    "state_momentum": 0.5,
    "fixed_prediction": False,
    "output_weight": 2.0,
    "hidden_weights": [1.0, 0.5],  # one per hidden layer
    "tolerance": 1e-3,
    "fast_path": False,
    # TargetPropagationSettings
    "variant": "tp",
    "beta": 0.25,
    "feedback": "nonlinear",
    "feedback_training": "noisy",
    "ridge": 0.2,
    "ridge_noise": 0.05,
    "noise_std": 0.05,
    "feedback_steps": 2,
    "layer_weights": [1.0, 0.5, 2.0],  # one per block
    "compute_bp_angle": True,
    # TargetPropagationModuleSettings
    "feedback_pretrain_epochs": 1,
    "input_shape": [IN],
    # TrainingSettings
    "parametrization": "mup",
    "output_weight_exponent": -1.0,
    "base_width": 4,
    "base_shapes": _BASE_SHAPES,
    "lr": 0.05,
    "optimizer": "adam",
    "momentum": 0.9,
    "weight_decay": 0.01,
    "loss": "cross_entropy",
    "accumulate_grad_batches": 2,
    "gradient_clip_val": 1.0,
    "gradient_clip_algorithm": "value",
    "skip_nonfinite_batches": True,
    "max_weight_magnitude": 1e4,
    "compile_inference": True,
    "compile_backend": "eager",
}

# Settings that cannot all be non-default at once: TP's feedback-only steps (several feedback
# steps, pre-training) step the optimizer between micro-batches, so they exclude gradient
# accumulation. Each round keeps one side at its default; together the rounds cover all.
EXCLUSIVE = {"accumulate_grad_batches": ("feedback_steps", "feedback_pretrain_epochs")}


def _settings_classes(cls: type[LocalLearningModule]) -> list[type]:
    return [cls.rule_class.Settings, cls.module_settings, TrainingSettings]


def _fields(cls: type[LocalLearningModule]) -> list[dataclasses.Field]:
    return [f for settings in _settings_classes(cls) for f in dataclasses.fields(settings)]


def _plain(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _non_default(name: str) -> Any:
    if name not in NON_DEFAULT:
        pytest.fail(
            f"setting {name!r} has no entry in NON_DEFAULT: add a valid non-default value so "
            "its round trip through hparams, YAML, checkpoints and the CLI is tested."
        )
    return NON_DEFAULT[name]


def _write_base_shapes(cls: type[LocalLearningModule], values: dict[str, Any], path: Path) -> str:
    """A .bsh file of the network as ``cls``'s rule trains it (TP: with its feedback maps)."""
    rule_names = set(cls.rule_class.Settings.field_names())
    rule = cls.rule_class("mse", **{k: v for k, v in values.items() if k in rule_names})
    input_shape = values.get("input_shape")

    def prepared(width: int) -> nn.Module:
        return rule.prepare_network(MLP(**{**NETWORK, "width": width}), input_shape)

    set_base_shapes(prepared(WIDTH), prepared(4), prepared(8), savefile=path)
    assert path.is_file()
    return str(path)


def _values(cls: type[LocalLearningModule], tmp_path: Path, round_: int = 0) -> dict[str, Any]:
    """Every setting of ``cls`` with a non-default value (checked non-default); of an
    EXCLUSIVE pair present in ``cls``, round 0 keeps the key, round 1 the others, default."""
    values = {}
    names = {f.name for f in _fields(cls)}
    defaults: set[str] = set()
    for key, others in EXCLUSIVE.items():
        if key in names and names & set(others):
            defaults |= set(others) if round_ == 0 else {key}
    for field in _fields(cls):
        value = _non_default(field.name)
        assert _plain(value) != _plain(field.default), f"{field.name}: {value!r} is the default"
        values[field.name] = field.default if field.name in defaults else value
    if values.get("base_shapes") is _BASE_SHAPES:
        values["base_shapes"] = _write_base_shapes(cls, values, tmp_path / "net.bsh")
    return values


def _settings(module: LocalLearningModule) -> tuple:
    return module.rule_settings, module.extra_settings, module.training_settings


def _check_settings(module: LocalLearningModule, values: dict[str, Any]) -> None:
    for name, value in values.items():
        assert _plain(module.hparams[name]) == _plain(value), name
    declared = {
        **module.rule_settings.to_dict(),
        **module.extra_settings.to_dict(),
        **module.training_settings.to_dict(),
    }
    assert {name: _plain(v) for name, v in values.items()} == declared


def _loader() -> DataLoader:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(16, IN, generator=generator)
    y = torch.randint(0, CLASSES, (16,), generator=generator)
    return DataLoader(TensorDataset(x, y), batch_size=8)


def _trainer(tmp_path: Path) -> L.Trainer:
    return L.Trainer(
        accelerator="cpu", devices=1, max_steps=1, limit_val_batches=0, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        num_sanity_val_steps=0, default_root_dir=tmp_path,
    )


# ----------------------------------------------------------------------------- signatures
def test_every_rule_has_a_preset_module():
    assert {cls.rule_class for cls in PRESETS} == set(RULES.values())
    assert {BackpropModule, PredictiveCodingModule, TargetPropagationModule} <= set(PRESETS)


@pytest.mark.parametrize("cls", PRESETS, ids=lambda cls: cls.__name__)
def test_module_signatures_are_the_declared_settings(cls):
    parameters = dict(inspect.signature(cls.__init__).parameters)
    assert list(parameters)[:2] == ["self", "network"]
    del parameters["self"], parameters["network"]
    fields = _fields(cls)
    assert list(parameters) == [f.name for f in fields]
    assert list(cls.setting_names()) == [f.name for f in fields]
    for field in fields:
        assert field.default is not dataclasses.MISSING, field.name
        assert parameters[field.name].default == field.default, field.name
        assert parameters[field.name].kind is inspect.Parameter.KEYWORD_ONLY, field.name


# ----------------------------------------------------------------------------- round trips
@pytest.mark.parametrize("round_", [0, 1])
@pytest.mark.parametrize("cls", PRESETS, ids=lambda cls: cls.__name__)
def test_every_setting_round_trips_through_hparams_yaml_and_checkpoint(
    cls, round_, tmp_path, data_dir
):
    values = _values(cls, tmp_path, round_)
    torch.manual_seed(0)
    module = cls(network=MLP(**NETWORK), **values)
    _check_settings(module, values)
    assert module.parametrization.name == "mup"
    assert module.rule.loss.name == "cross_entropy"

    # (a) hparams -> YAML -> constructor
    hparams_file = tmp_path / "hparams.yaml"
    save_hparams_to_yaml(hparams_file, module.hparams)
    rebuilt = cls(**load_hparams_from_yaml(hparams_file))
    assert _settings(rebuilt) == _settings(module)
    _check_settings(rebuilt, values)

    # (b) a fitted step -> checkpoint -> load_from_checkpoint(path) alone
    trainer = _trainer(tmp_path)
    trainer.fit(module, train_dataloaders=_loader())
    assert trainer.global_step == 1
    checkpoint = tmp_path / "one_step.ckpt"
    trainer.save_checkpoint(checkpoint)
    loaded = cls.load_from_checkpoint(checkpoint)
    assert _settings(loaded) == _settings(module)
    _check_settings(loaded, values)
    expected, got = module.state_dict(), loaded.state_dict()
    assert list(got) == list(expected)
    for name, tensor in expected.items():
        assert torch.equal(got[name], tensor), name
    shapes = {n: p.infshape for n, p in module.named_parameters() if hasattr(p, "infshape")}
    assert shapes  # muP: base shapes from the .bsh file
    for name, p in loaded.named_parameters():
        assert str(p.infshape) == str(shapes[name]), name

    # (c) LightningCLI reads every setting from a YAML config
    config = {
        "model": {
            "class_path": f"{cls.__module__}.{cls.__qualname__}",
            "init_args": {
                "network": {"class_path": "lightning_local.models.MLP", "init_args": NETWORK},
                **{name: _plain(value) for name, value in values.items()},
            },
        },
        "trainer": {"max_steps": 1, "limit_val_batches": 0, "logger": False,
                    "enable_checkpointing": False, "default_root_dir": str(tmp_path / "cli")},
    }
    config_file = tmp_path / "config.yaml"
    config_file.write_text(yaml.safe_dump(config))
    cli = run_lightning_cli(
        ["fit", "--config", str(config_file), *QUIET,
         "--data.data_dir", data_dir, "--data.num_samples", "300"]
    )
    assert type(cli.model) is cls
    assert cli.trainer.global_step == 1
    assert _settings(cli.model) == _settings(module)
    _check_settings(cli.model, values)


# ----------------------------------------------------------------------------- no restating
def _rule_files() -> dict[str, tuple[set[str], Path]]:
    return {
        name: (set(cls.Settings.field_names()), Path(inspect.getfile(cls)).resolve())
        for name, cls in RULES.items()
    }


def _normalized(option: str) -> set[str]:
    name = option.lstrip("-").replace("-", "_")
    return {name, name.removeprefix("no_")}


# The deep-linear analysis states the PC energy's equilibrium in closed form (docs/math.md
# §4.2): its gamma_l (output_weight, hidden_weights) and FPA are the parameters of those
# formulas, compared against the rule in tests/test_deep_linear.py, not a copy of the rule's
# settings declaration (no defaults are read from it and no rule is built there).
CLOSED_FORMS = {"lightning_local/diagnostics/deep_linear.py"}


def test_rule_settings_are_not_restated_in_the_library():
    """Rule settings reach other code as a variant string, a Settings object or **settings:
    no function outside the rule's own file takes two or more of them as parameters, and no
    argparse parser declares one as a hand-written option."""
    rules = _rule_files()
    assert all(fields for name, (fields, _) in rules.items() if name != "bp")
    root = Path(lightning_local.__file__).resolve().parent
    offences = []
    files = sorted(root.rglob("*.py"))
    assert len(files) > 20
    for path in files:
        tree = ast.parse(path.read_text(), filename=str(path))
        where = path.relative_to(root.parent)
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                args = node.args
                names = {a.arg for a in [*args.posonlyargs, *args.args, *args.kwonlyargs]}
                for rule, (fields, own_file) in rules.items():
                    restated = sorted(names & fields)
                    if (len(restated) >= 2 and path.resolve() != own_file
                            and where.as_posix() not in CLOSED_FORMS):
                        offences.append(f"{where}:{node.lineno} def {node.name}: {rule} "
                                        f"settings {restated} as parameters")
            elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                  and node.func.attr == "add_argument"):
                options = [a.value for a in node.args
                           if isinstance(a, ast.Constant) and isinstance(a.value, str)]
                options += [k.value.value for k in node.keywords
                            if k.arg == "dest" and isinstance(k.value, ast.Constant)
                            and isinstance(k.value.value, str)]
                for option in options:
                    for rule, (fields, _) in rules.items():
                        if _normalized(option) & fields:
                            offences.append(f"{where}:{node.lineno} add_argument({option!r}): "
                                            f"a {rule} setting as a hand-written option")
    assert not offences, "rule settings restated outside their rule:\n" + "\n".join(offences)


def test_the_restating_scan_finds_a_restatement(tmp_path):
    """The scan above is not vacuous: it reads parameters and options as intended."""
    source = (
        "def f(x, inference_steps=1, inference_lr=1.0):\n    pass\n"
        "parser.add_argument('--inference-steps', type=int)\n"
    )
    tree = ast.parse(source)
    pc_fields = _rule_files()["pc"][0]
    function = next(n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef))
    assert len({a.arg for a in function.args.args} & pc_fields) == 2
    call = next(n for n in ast.walk(tree) if isinstance(n, ast.Call))
    assert _normalized(call.args[0].value) & pc_fields


# ----------------------------------------------------------------------------- run keys
def _result_fields(settings: type) -> set[str]:
    return {f.name for f in dataclasses.fields(settings) if f.metadata.get("affects_result", True)}


@pytest.mark.parametrize("name", sorted(RULE_VARIANTS))
@pytest.mark.parametrize("loss", ["mse", "cross_entropy"])
def test_variant_hparams_are_the_result_settings(name, loss):
    variant = parse_variant(name)
    cls = get_rule_class(variant.family)
    settings = cls.Settings.build(variant.kwargs)
    expected = {"rule": cls.name, "loss": loss, **settings.result_dict()}
    assert variant.hparams(loss) == expected
    assert set(variant.hparams(loss)) == {"rule", "loss"} | _result_fields(cls.Settings)


def _key(rule: str | RuleVariant) -> str:
    spec = SweepConfig(rules=[rule], parametrizations=["sp"], widths=[64], lrs=[0.1]).run_specs()[0]
    assert spec["key"] == run_key({k: v for k, v in spec.items()
                                   if k != "key" and not k.startswith("_")})
    return spec["key"]


@pytest.mark.parametrize("family", sorted(set(RULES) - {"bp"}))
def test_run_key_uses_result_settings(family):
    """A setting declared affects_result=False (PC's fast_path, TP's compute_bp_angle) leaves
    the run key alone; one that can change the weights changes it.

    Each setting is changed twice: in a RuleVariant that keeps the variant's name (the key
    must read the settings) and, where the value has no comma (the override syntax splits on
    commas), as a ``name:setting=value`` string as on the command line."""
    name = next(n for n, (f, _) in RULE_VARIANTS.items() if f == family)
    base = parse_variant(name)
    settings = get_rule_class(family).Settings
    base_hparams, base_key = base.hparams(), _key(name)
    fields = settings.field_names()
    result_fields = _result_fields(settings)
    assert set(fields) - result_fields, f"{family} declares no affects_result=False setting"
    strings = 0
    for field in fields:
        changes = {field: NON_DEFAULT[field]}
        if field in ("feedback", "feedback_steps"):  # valid only with noisy feedback
            changes["feedback_training"] = "noisy"
        variants = [RuleVariant(base.name, family, {**base.kwargs, **changes})]
        texts = [f"{k}={json.dumps(v)}" for k, v in changes.items()]
        if not any("," in text for text in texts):
            variants.append(f"{name}:" + ",".join(texts))
            strings += 1
        for variant in variants:
            hparams, key = parse_variant(variant).hparams(), _key(variant)
            if field in result_fields:
                assert hparams != base_hparams, variant
                assert key != base_key, variant
            else:
                assert hparams == base_hparams, variant
                assert key == base_key, (
                    f"{variant!r} changes the run key, but {field} is declared "
                    "affects_result=False"
                )
    assert strings >= len(fields) // 2


# ----------------------------------------------------------------------------- errors
@pytest.mark.parametrize("cls", PRESETS, ids=lambda cls: cls.__name__)
def test_unknown_setting_is_refused_with_the_valid_names(cls):
    names = cls.setting_names()
    typo = names[0][:-1]  # e.g. "inference" -> "inferenc"
    assert typo not in names
    with pytest.raises(LocalLearningError) as error:
        cls(network=MLP(**NETWORK), **{typo: _plain(_non_default(names[0]))})
    message = str(error.value)
    assert repr(typo) in message
    for name in names:
        assert name in message, name
    rule_names = cls.rule_class.Settings.field_names()
    if rule_names:  # the plain rule refuses it too, listing its own settings
        with pytest.raises(LocalLearningError) as error:
            cls.rule_class("mse", **{rule_names[0] + "s": 1})
        assert all(name in str(error.value) for name in rule_names)


# ----------------------------------------------------------------------------- wire
def _mlp(width: int, seed: int = 0) -> MLP:
    torch.manual_seed(seed)
    return MLP(in_features=IN, width=width, num_classes=CLASSES, depth=DEPTH)


def _groups(optimizer: torch.optim.Optimizer, network: nn.Module) -> list[tuple]:
    names = {id(p): n for n, p in network.named_parameters()}
    return [
        (g["role"], g["lr"], g["weight_decay"], [names[id(p)] for p in g["params"]])
        for g in optimizer.param_groups
    ]


def test_wire_matches_module():
    width, base, gamma = 64, 16, 2.0
    run = wire(_mlp(width), PredictiveCoding(output_weight=gamma), "mup", base_width=base,
               output_weight_exponent=-1.0)
    module = PredictiveCodingModule(network=_mlp(width), output_weight=gamma,
                                    parametrization="mup", base_width=base,
                                    output_weight_exponent=-1)
    wired, fresh = module.local_run.network, _mlp(width)
    pairs = list(zip(run.network.named_parameters(), wired.named_parameters()))
    assert len(pairs) == len(list(fresh.parameters()))
    for (name_a, a), (name_b, b) in pairs:
        assert name_a == name_b
        assert torch.equal(a, b), name_a
        assert str(a.infshape) == str(b.infshape), name_a
    # the muP init rescale ran (identically) in both
    assert any(not torch.equal(p, q) for p, q in zip(run.network.parameters(), fresh.parameters()))

    groups = _groups(run.build_optimizer(module.lr), run.network)
    assert groups == _groups(module.configure_optimizers(), wired)
    assert len({role for role, *_ in groups}) == len(groups) > 1

    # gamma_L = gamma_L' m^-g with m = M / M_base and g = -1 (docs/math.md section 3)
    assert run.rule.output_weight == pytest.approx(gamma * width / base)
    assert module.rule.output_weight == run.rule.output_weight
    assert module.effective_output_weight() == run.rule.output_weight


def _sequential(width: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(IN, width), nn.Tanh(), nn.Linear(width, CLASSES))


def test_wire_needs_base_shapes_or_a_width_factory():
    with pytest.raises(MissingBaseShapesError):
        wire(_sequential(64), PredictiveCoding(), "mup", base_width=16)
    with pytest.raises(MissingBaseShapesError):
        PredictiveCodingModule(network=_sequential(64), parametrization="mup", base_width=16)
    assert wire(_sequential(64), PredictiveCoding(), "sp").width_mult == 1.0

    run = wire(_sequential(64), PredictiveCoding(), "mup", base_width=16,
               width_factory=_sequential)
    assert run.width_mult == pytest.approx(64 / 16)
    base, delta = dict(_sequential(16).named_parameters()), dict(_sequential(32).named_parameters())
    for name, p in run.network.named_parameters():
        expected = [b if b != d else None for b, d in zip(base[name].shape, delta[name].shape)]
        assert [dim.base_dim for dim in p.infshape] == expected, name
        assert [dim.dim for dim in p.infshape] == list(p.shape), name
    assert any(dim.base_dim == 16 for p in run.network.parameters() for dim in p.infshape)
