"""Attaching mup base shapes: sources (networks, builders, .bsh files), errors, persistence."""

from __future__ import annotations

import copy
import io

import mup
import pytest
import torch
from torch import nn

from lightning_local.errors import (
    CheckpointError,
    LocalLearningError,
    MissingBaseShapesError,
    ShapeMismatchError,
    UnclassifiableParameterError,
)
from lightning_local.models import MLP
from lightning_local.parametrization import (
    MuP,
    base_shapes_from_builder,
    classify_parameters,
    has_base_shapes,
    load_base_shapes,
    reattach_base_shapes,
    set_base_shapes,
)


def infshapes(model):
    return {name: (p.infshape.base_shape(), p.infshape.shape()) for name, p in
            model.named_parameters()}


# Written by hand: MLP(in 40, classes 10, depth 3) at width 256 with base width 64.
EXPECTED_MLP = {
    "0.0.weight": ([64, None], [256, 40]),
    "0.0.bias": ([64], [256]),
    "1.0.weight": ([64, 64], [256, 256]),
    "1.0.bias": ([64], [256]),
    "2.weight": ([None, 64], [10, 256]),
    "2.bias": ([None], [10]),
}


def test_every_source_gives_the_same_shapes(tmp_path):
    from_int = set_base_shapes(MLP(width=256), 64)
    from_networks = set_base_shapes(MLP(width=256), MLP(width=64), MLP(width=100))
    from_builder = set_base_shapes(MLP(width=256), base_shapes_from_builder(MLP(), 64))
    callable_builder = base_shapes_from_builder(lambda w: MLP(width=w), 64, 80)
    from_callable = set_base_shapes(MLP(width=256), callable_builder)
    for model in (from_int, from_networks, from_builder, from_callable):
        assert infshapes(model) == EXPECTED_MLP
        assert MuP().width_mult(model) == 4.0
    # the model may serve as the base itself when a delta is given
    assert infshapes(set_base_shapes(MLP(width=64), None, MLP(width=128)))["2.weight"] == (
        [None, 64], [10, 64])


def test_bsh_file_round_trip(tmp_path):
    path = tmp_path / "mlp.bsh"
    set_base_shapes(MLP(width=128), 64, savefile=path)
    assert "null" in path.read_text()  # mup's yaml format
    for source in (str(path), path):
        assert infshapes(set_base_shapes(MLP(width=256), source)) == EXPECTED_MLP
    builder_file = tmp_path / "builder.bsh"
    base_shapes_from_builder(MLP(), 64, savefile=builder_file)
    assert infshapes(set_base_shapes(MLP(width=256), str(builder_file))) == EXPECTED_MLP
    # and mup itself reads our file
    mup_model = MLP(width=256)
    mup.set_base_shapes(mup_model, str(path), rescale_params=False, do_assert=False)
    assert infshapes(mup_model) == EXPECTED_MLP


@pytest.mark.parametrize("content", [None, "0.0.weight: [64, \n  - oops", "just a string",
                                     "0.0.weight: [-3, null]"])
def test_missing_or_corrupt_bsh_file(tmp_path, content):
    path = tmp_path / "broken.bsh"
    if content is not None:
        path.write_text(content)
    with pytest.raises(CheckpointError, match="broken.bsh") as info:
        set_base_shapes(MLP(width=128), path)
    assert "Fix:" in str(info.value)
    with pytest.raises(CheckpointError, match="broken.bsh"):
        load_base_shapes(path)


def test_truncated_or_foreign_bsh_file(tmp_path):
    path = tmp_path / "mlp.bsh"
    set_base_shapes(MLP(width=128), 64, savefile=path)
    lines = path.read_text().splitlines()
    truncated = tmp_path / "truncated.bsh"
    truncated.write_text("\n".join(lines[: len(lines) // 2]))
    with pytest.raises(CheckpointError, match="truncated.bsh"):
        set_base_shapes(MLP(width=128), truncated)
    one_missing = tmp_path / "one_missing.bsh"
    one_missing.write_text("\n".join(line for line in lines if not line.startswith("2.bias")))
    with pytest.raises(CheckpointError, match=r"one_missing.bsh.*names only in the model: \['2"):
        set_base_shapes(MLP(width=128), one_missing)
    with pytest.raises(CheckpointError, match="mlp.bsh"):
        set_base_shapes(MLP(width=128, depth=4), path)


def test_unwritable_savefile(tmp_path):
    with pytest.raises(CheckpointError, match="no_such_folder"):
        set_base_shapes(MLP(width=128), 64, savefile=tmp_path / "no_such_folder" / "x.bsh")


def test_no_width_dimension_and_mismatched_networks():
    with pytest.raises(MissingBaseShapesError, match="delta"):
        set_base_shapes(MLP(width=64), MLP(width=64))
    with pytest.raises(MissingBaseShapesError, match="delta"):
        set_base_shapes(MLP(width=64))
    with pytest.raises(ShapeMismatchError, match="names only"):
        set_base_shapes(MLP(width=128), MLP(width=64, depth=4), MLP(width=96, depth=4))
    with pytest.raises(Exception, match="delta width different"):
        base_shapes_from_builder(MLP(), 64, 64)
    with pytest.raises(Exception, match="WidthBuilder"):
        set_base_shapes(nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2)), 2)


def test_set_base_shapes_never_rescales():
    model = MLP(width=256)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)  # non-zero biases: mup's rescale_params=True would change them
    before = [p.detach().clone() for p in model.parameters()]
    set_base_shapes(model, 64)
    set_base_shapes(model, 64)
    for p, p0 in zip(model.parameters(), before):
        assert torch.equal(p, p0)
    # the reference: mup's default rescale does change this model's biases
    mup.set_base_shapes(model, MLP(width=64), delta=MLP(width=128), do_assert=False)
    assert not torch.equal(model[1][0].bias, before[3])  # the hidden bias


def _initialized(width=256):
    torch.manual_seed(0)
    model = set_base_shapes(MLP(width=width), 64)
    MuP().initialize(model)
    return model


def test_infshape_survives_torch_save_and_in_place_load():
    model = _initialized()
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    assert infshapes(loaded) == EXPECTED_MLP
    MuP().initialize(loaded)  # the init mark came along: no second rescale
    assert torch.equal(loaded[2].weight, model[2].weight)

    fresh = set_base_shapes(MLP(width=256), 64)
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    buffer.seek(0)
    fresh.load_state_dict(torch.load(buffer))
    assert infshapes(fresh) == EXPECTED_MLP
    assert torch.equal(fresh[2].weight, model[2].weight)


def test_deepcopy_and_assign_lose_shapes_and_reattach_restores_them(tmp_path):
    model = _initialized()
    copied = copy.deepcopy(model)
    assert not has_base_shapes(copied)  # the trap, as documented
    with pytest.raises(MissingBaseShapesError, match="reattach_base_shapes"):
        MuP().param_groups(copied, 0.1)
    weights = [p.detach().clone() for p in copied.parameters()]
    reattach_base_shapes(copied, model)
    assert has_base_shapes(copied) and infshapes(copied) == EXPECTED_MLP
    assert all(torch.equal(p, w) for p, w in zip(copied.parameters(), weights))

    assigned = set_base_shapes(MLP(width=256), 64)
    assigned.load_state_dict(model.state_dict(), assign=True)
    assert not has_base_shapes(assigned)
    path = tmp_path / "mlp.bsh"
    set_base_shapes(MLP(width=128), 64, savefile=path)
    reattach_base_shapes(assigned, path)
    assert infshapes(assigned) == EXPECTED_MLP
    assert torch.equal(assigned[2].weight, model[2].weight)
    with pytest.raises(MissingBaseShapesError, match="source network"):
        reattach_base_shapes(assigned, MLP(width=256))


def test_data_parallel_wrapper_is_unwrapped():
    model = MLP(width=256)
    wrapped = nn.DataParallel(model)
    set_base_shapes(wrapped, 64)
    assert infshapes(model) == EXPECTED_MLP
    assert has_base_shapes(wrapped)
    assert [g["role"] for g in MuP().param_groups(wrapped, 0.1)] == [
        "input", "hidden", "output", "vector", "scalar"]


# --------------------------------------------- base shapes from a network of other data sizes
def _roles(model):
    return {item.name: item.role for item in classify_parameters(model)}


@pytest.mark.parametrize("base, delta, layer, sizes", [
    (MLP(in_features=20, width=64), None, "input layer '0.0'", "40 in the model, 20 in the base"),
    (MLP(in_features=20, width=64), MLP(in_features=40, width=128), "input layer '0.0'",
     "40 in the model, 20 in the base"),
    (MLP(num_classes=5, width=64), None, "readout '2'", "10 in the model, 5 in the base"),
], ids=["input-no-delta", "input-delta", "classes"])
def test_base_network_with_other_data_sizes_is_refused(base, delta, layer, sizes):
    # the reference: mup classes the layer as hidden, silently (wrong init and learning rate)
    reference = MLP(width=128)
    mup.set_base_shapes(reference, base, delta=delta, rescale_params=False, do_assert=False)
    assert "hidden" in {_roles(reference)["0.0.weight"], _roles(reference)["2.weight"]}
    with pytest.raises(UnclassifiableParameterError, match="Fix: build the base") as info:
        set_base_shapes(MLP(width=128), base, delta)
    assert layer in str(info.value) and sizes in str(info.value)
    assert not has_base_shapes(MLP(width=128))


def test_user_attached_shapes_of_another_input_size_are_refused_when_wired():
    from lightning_local.rules import Backprop
    from lightning_local.wiring import wire

    model = MLP(width=128)
    mup.set_base_shapes(model, MLP(in_features=20, width=64), rescale_params=False,
                        do_assert=False)
    with pytest.raises(UnclassifiableParameterError, match=r"p\.infshape.*input layer '0\.0'"):
        wire(model, Backprop(), "mup")
    wire(model, Backprop(), "sp")  # SP does not use the shapes


def test_only_data_dims_are_checked():
    # a base network of another input size whose delta agrees with it: the dim is finite
    # (not a width) and the input layer keeps its role
    model = set_base_shapes(MLP(width=128), MLP(in_features=20, width=64),
                            MLP(in_features=20, width=96))
    assert _roles(model)["0.0.weight"] == "input" and _roles(model)["2.weight"] == "output"

    def embedded(width):  # the layer after an embedding into the width is hidden, rightly
        return nn.Sequential(nn.Sequential(nn.Embedding(10, width), nn.Linear(width, width)),
                             nn.Linear(width, 3))

    set_base_shapes(embedded(128), embedded(64), embedded(96))


def test_image_size_differences_name_the_dims_that_do_not_scale_together():
    from lightning_local.models import CNN

    model = set_base_shapes(CNN(image_size=28, width=16), CNN(image_size=32, width=8),
                            CNN(image_size=32, width=12))
    expected = r"dim 1 of '2\.1\.weight' \(512 in the base -> 784\)"
    with pytest.raises(UnclassifiableParameterError, match=expected) as info:
        MuP().width_mult(model)
    assert "image size" in str(info.value) and "Fix:" in str(info.value)


# ------------------------------------------------------------ attaching again, and mup's rescale
def _plain(width, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Sequential(nn.Linear(6, width), nn.Tanh()),
                         nn.Sequential(nn.Linear(width, width), nn.Tanh()), nn.Linear(width, 3))


def test_mup_rescaled_network_is_refused_when_wired():
    from lightning_local.modules import PredictiveCodingModule
    from lightning_local.rules import PredictiveCoding
    from lightning_local.wiring import wire

    fresh = _plain(64)
    model = mup.set_base_shapes(_plain(64), _plain(16), delta=_plain(32), do_assert=False)
    # the reference: mup's default rescale changed the (non-zero) biases
    assert not torch.equal(model[1][0].bias, fresh[1][0].bias)
    for make in (lambda: wire(model, PredictiveCoding(), "mup"),
                 lambda: PredictiveCodingModule(model, parametrization="mup")):
        with pytest.raises(LocalLearningError, match=r"\['1\.0', '2'\] were rescaled by "
                                                     r"mup\.set_base_shapes.*rescale_params=False"):
            make()
    # without the rescale mup only attaches shapes: accepted, like ours
    attached = mup.set_base_shapes(_plain(64), _plain(16), delta=_plain(32),
                                   rescale_params=False, do_assert=False)
    assert wire(attached, PredictiveCoding(), "mup").width_mult == 4.0
    # the builders' zero biases are unchanged by mup's rescale: nothing to refuse
    zero_biases = mup.set_base_shapes(MLP(width=64), MLP(width=16), delta=MLP(width=32),
                                      do_assert=False)
    assert wire(zero_biases, PredictiveCoding(), "mup").width_mult == 4.0


def test_attaching_again_is_harmless_until_the_init_was_rescaled_for_other_shapes():
    from lightning_local.rules import PredictiveCoding
    from lightning_local.wiring import wire

    model = set_base_shapes(_plain(64), _plain(32), _plain(16))
    set_base_shapes(model, _plain(16), _plain(32))  # before the init rescale: may change
    run = wire(model, PredictiveCoding(), "mup")
    weights = [p.detach().clone() for p in model.parameters()]
    set_base_shapes(model, _plain(16), _plain(32))  # the same shapes again: harmless
    assert all(torch.equal(p, w) for p, w in zip(model.parameters(), weights))
    assert run.width_mult == 4.0 and run.param_groups(0.1)
    with pytest.raises(LocalLearningError, match=r"already rescaled .*base \[32, None\], was "
                                                 r"\[16, None\].*Fix: build the network afresh"):
        set_base_shapes(model, _plain(32), _plain(16))
    assert run.width_mult == 4.0  # refused before anything was attached
    # mup's own function cannot be stopped; the optimizer built from the wired run then is
    mup.set_base_shapes(model, _plain(32), delta=_plain(16), rescale_params=False,
                        do_assert=False)
    with pytest.raises(LocalLearningError, match=r"rescaled for the width multiplier m = 4, "
                                                 r"but the network's p\.infshape now give m = 2"):
        run.make_optimizer(torch.optim.SGD, lr=0.1)
