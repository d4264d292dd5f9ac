"""The network view: which models are layered, and the errors for those that are not."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from lightning_local.errors import ShapeMismatchError, UnsupportedNetworkError
from lightning_local.network import ACTIVATIONS, as_blocks, feedforward, output_width
from lightning_local.rules import PredictiveCoding, TargetPropagation
from lightning_local.rules._linearize import supports_fast_path


class _Exposing(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([nn.Linear(3, 4), nn.Linear(4, 2)])

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return x


def test_sequential_and_exposed_blocks():
    seq = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    assert as_blocks(seq, group_activations=False) == list(seq)
    model = _Exposing()
    assert as_blocks(model) == list(model.blocks)
    x = torch.randn(5, 3)
    torch.testing.assert_close(feedforward(as_blocks(model), x)[-1], model(x))
    assert len(feedforward(as_blocks(seq), x)) == 3  # the Tanh joins the Linear before it
    assert len(feedforward(as_blocks(seq, group_activations=False), x)) == 4
    assert output_width(as_blocks(seq)) == 2


def test_unsupported_models_get_clear_errors():
    with pytest.raises(UnsupportedNetworkError, match="ordered list of blocks"):
        as_blocks(nn.Linear(3, 2))
    with pytest.raises(UnsupportedNetworkError, match="at least two"):
        as_blocks(nn.Sequential(nn.Linear(3, 2)))


def test_shape_mismatch_names_the_block():
    seq = nn.Sequential(nn.Linear(3, 4), nn.Linear(5, 2))
    with pytest.raises(ShapeMismatchError, match="block 1"):
        feedforward(as_blocks(seq), torch.randn(2, 3))


# ----------------------------------------------------------- grouping of stand-alone activations
def _flat(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 3)
    ).double()


def _hand_grouped(flat: nn.Sequential) -> nn.Sequential:
    """The same network written as blocks by hand, from copies of ``flat``'s layers."""
    l1, t1, l2, t2, l3 = (copy.deepcopy(m) for m in flat)
    return nn.Sequential(nn.Sequential(l1, t1), nn.Sequential(l2, t2), l3)


def _data(seed: int = 1):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(7, 4, generator=generator, dtype=torch.float64)
    y = torch.randint(0, 3, (7,), generator=generator)
    return x, y


def _grads(net: nn.Module, surrogate: torch.Tensor) -> list[torch.Tensor]:
    net.zero_grad(set_to_none=True)
    surrogate.backward()
    return [p.grad.detach().clone() for p in net.parameters()]


def test_flat_sequential_groups_activations_with_the_layer_before():
    flat = _flat()
    blocks = as_blocks(flat)
    children = list(flat)
    assert len(blocks) == 3
    assert isinstance(blocks[0], nn.Sequential) and isinstance(blocks[1], nn.Sequential)
    assert list(blocks[0]) == children[0:2] and list(blocks[1]) == children[2:4]
    assert all(a is b for a, b in zip(blocks[0], children[0:2]))
    assert all(a is b for a, b in zip(blocks[1], children[2:4]))
    assert blocks[2] is children[4]
    ours = [p for block in blocks for p in block.parameters()]
    assert len(ours) == len(list(flat.parameters()))
    assert all(a is b for a, b in zip(ours, flat.parameters()))
    assert list(flat) == children and len(flat) == 5  # the user's model is untouched
    x, _ = _data()
    assert torch.equal(feedforward(blocks, x)[-1], flat(x))


def test_consecutive_activations_join_the_preceding_block():
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Tanh(), nn.Linear(4, 2), nn.Sigmoid())
    blocks = as_blocks(model)
    assert len(blocks) == 2
    assert all(a is b for a, b in zip(blocks[0], list(model)[:3])) and len(blocks[0]) == 3
    assert all(a is b for a, b in zip(blocks[1], list(model)[3:])) and len(blocks[1]) == 2
    x = torch.randn(5, 3)
    assert torch.equal(feedforward(blocks, x)[-1], model(x))


def test_every_listed_activation_is_grouped():
    for activation in ACTIVATIONS:
        model = nn.Sequential(nn.Linear(3, 4), activation(), nn.Linear(4, 2))
        assert len(as_blocks(model)) == 2, activation
    identity = nn.Sequential(nn.Linear(3, 4), nn.Identity(), nn.Linear(4, 2))
    assert len(as_blocks(identity)) == 3  # nn.Identity is not an activation here
    prelu = nn.Sequential(nn.Linear(3, 4), nn.PReLU(), nn.Linear(4, 2))
    assert len(as_blocks(prelu)) == 3  # has a parameter: a block of its own


def test_group_activations_false_keeps_every_child():
    flat = _flat()
    blocks = as_blocks(flat, group_activations=False)
    assert len(blocks) == 5
    assert all(a is b for a, b in zip(blocks, flat))
    assert len(as_blocks(flat)) == 3  # the opt-out does not change the default's cache


def test_leading_activation_is_refused_with_the_fix():
    model = nn.Sequential(nn.Tanh(), nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
    with pytest.raises(UnsupportedNetworkError, match="block 0") as info:
        as_blocks(model)
    assert "group each layer with its activation" in str(info.value)
    assert "nn.Sequential(nn.Sequential(nn.Linear(d, M), nn.Tanh()), ...)" in str(info.value)
    assert len(as_blocks(model, group_activations=False)) == 4


def test_fewer_than_two_blocks_is_checked_after_grouping():
    with pytest.raises(UnsupportedNetworkError, match="1 block"):
        as_blocks(nn.Sequential(nn.Linear(3, 2), nn.Tanh()))
    assert len(as_blocks(nn.Sequential(nn.Linear(3, 2), nn.Tanh()), group_activations=False)) == 2


def test_grouping_is_cached_per_model_and_redone_when_it_changes():
    flat = _flat()
    first, second = as_blocks(flat), as_blocks(flat)
    assert first == second and all(a is b for a, b in zip(first, second))
    as_list = as_blocks(list(flat))  # a plain list of the same modules: the same groups
    assert all(a is b for a, b in zip(as_list, first))
    flat.append(nn.Tanh())
    appended = as_blocks(flat)
    assert len(appended) == 3 and isinstance(appended[2], nn.Sequential)
    assert appended[2][0] is flat[4] and appended[2][1] is flat[5]
    assert appended[0] is first[0] and appended[1] is first[1]
    flat[2] = nn.Linear(8, 8).double()
    changed = as_blocks(flat)
    assert changed[1][0] is flat[2] and changed[1] is not first[1]
    assert changed[0] is first[0]
    x, _ = _data()
    assert torch.equal(feedforward(changed, x)[-1], flat(x))


def test_grouped_blocks_follow_the_model_train_mode():
    flat = _flat()
    flat.eval()
    assert not any(block.training for block in as_blocks(flat))
    flat.train()
    assert all(block.training for block in as_blocks(flat))


@pytest.mark.parametrize("fast_path", [True, False])
def test_predictive_coding_on_flat_equals_hand_grouped(fast_path):
    flat = _flat()
    grouped = _hand_grouped(flat)
    x, y = _data()
    pc = PredictiveCoding("mse", inference="simultaneous", inference_steps=8, fast_path=fast_path)
    flat_grads = _grads(flat, pc.training_loss(flat, x, y).surrogate)
    grouped_grads = _grads(grouped, pc.training_loss(grouped, x, y).surrogate)
    assert len(flat_grads) == len(grouped_grads) == 6
    for a, b in zip(flat_grads, grouped_grads):
        assert torch.allclose(a, b, rtol=1e-12, atol=1e-14)
    assert any(float(g.abs().max()) > 0 for g in flat_grads)


def test_grouped_blocks_take_the_fast_path_like_hand_written_ones():
    flat = _flat()
    grouped = _hand_grouped(flat)
    assert [supports_fast_path(b) for b in as_blocks(flat)] == [
        supports_fast_path(b) for b in as_blocks(grouped)
    ] == [True, True, True]
    x, y = _data()
    pc = PredictiveCoding("mse", inference="simultaneous", inference_steps=8, fast_path=True)
    flat_grads = _grads(flat, pc.training_loss(flat, x, y).surrogate)
    grouped_grads = _grads(grouped, pc.training_loss(grouped, x, y).surrogate)
    for a, b in zip(flat_grads, grouped_grads):
        assert torch.equal(a, b)  # the same closed-form computation, bit for bit
    slow = PredictiveCoding("mse", inference="simultaneous", inference_steps=8, fast_path=False)
    slow_grads = _grads(flat, slow.training_loss(flat, x, y).surrogate)
    for a, b in zip(flat_grads, slow_grads):
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-12)


def test_target_propagation_builds_feedback_for_a_flat_model():
    flat = _flat()
    grouped = _hand_grouped(flat)
    rule = TargetPropagation("mse")
    torch.manual_seed(5)
    network = rule.prepare_network(flat).double()
    torch.manual_seed(5)
    reference = rule.build_network(grouped).double()
    assert len(network.feedback) == len(as_blocks(network)) - 1 == 2
    x, y = _data()
    hidden = feedforward(as_blocks(network), x)
    for index, g in enumerate(network.feedback, start=2):  # g_l maps h_l back to h_(l-1)
        assert g(hidden[index]).shape == hidden[index - 1].shape
    flat_grads = _grads(network.blocks, rule.training_loss(network, x, y).surrogate)
    reference_grads = _grads(reference.blocks, rule.training_loss(reference, x, y).surrogate)
    assert len(flat_grads) == len(reference_grads) == 6
    assert any(float(g.abs().max()) > 0 for g in flat_grads)
    for a, b in zip(flat_grads, reference_grads):
        assert torch.allclose(a, b, rtol=1e-12, atol=1e-14)


# ------------------------------------------------------------------------ torch.compile
def _compile(module):
    return torch.compile(module, backend="eager")  # dynamo without a C++ toolchain


def _pc_gradients(network):
    from lightning_local.rules import PredictiveCoding

    rule = PredictiveCoding(inference="simultaneous", inference_steps=4, inference_lr=0.2,
                            fixed_prediction=False)
    generator = torch.Generator().manual_seed(3)
    x, y = torch.randn(8, 4, generator=generator), torch.randint(0, 3, (8,), generator=generator)
    for p in network.parameters():
        p.grad = None
    rule.training_loss(network, x, y).surrogate.backward()
    return [p.grad.clone() for p in network.parameters()]


def _tanh_net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Sequential(nn.Linear(4, 8), nn.Tanh()),
                         nn.Sequential(nn.Linear(8, 8), nn.Tanh()), nn.Linear(8, 3))


def test_a_compiled_network_is_read_through_its_original_module():
    from lightning_local.network import compiled_original

    net = _tanh_net()
    compiled = _compile(net)
    assert compiled_original(compiled) is net
    assert as_blocks(compiled) == as_blocks(net)
    reference = _pc_gradients(_tanh_net())
    for a, b in zip(_pc_gradients(compiled), reference):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_compiled_blocks_keep_the_fast_path_and_the_result():
    from lightning_local.rules._linearize import _affine_parts

    net = _tanh_net()
    compiled_blocks = nn.Sequential(*(_compile(block) for block in net))
    assert all(_affine_parts(block) is not None for block in compiled_blocks)
    reference = _pc_gradients(_tanh_net())
    for a, b in zip(_pc_gradients(compiled_blocks), reference):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_a_compiled_width_builder_gets_mup_base_shapes():
    from lightning_local.models import MLP
    from lightning_local.modules import PredictiveCodingModule

    torch.manual_seed(0)
    plain = PredictiveCodingModule(network=MLP(width=32), parametrization="mup", base_width=16)
    torch.manual_seed(0)
    compiled = PredictiveCodingModule(network=_compile(MLP(width=32)), parametrization="mup",
                                      base_width=16)
    for p, q in zip(plain.network.parameters(), compiled.network.parameters()):
        torch.testing.assert_close(q, p, rtol=0, atol=0)  # the same init rescale
        assert [d.width_mult() for d in q.infshape] == [d.width_mult() for d in p.infshape]
    groups = [(g["role"], g["lr"]) for g in compiled.configure_optimizers().param_groups]
    assert groups == [(g["role"], g["lr"]) for g in plain.configure_optimizers().param_groups]


# ------------------------------------------------ modules a block cannot be (refused in the view)
class _LastStep(nn.Module):
    """The fix the errors suggest: an LSTM wrapped to return one tensor."""

    def __init__(self) -> None:
        super().__init__()
        self.lstm = nn.LSTM(3, 8, batch_first=True)

    def forward(self, x):
        return self.lstm(x)[0][:, -1]


class _SelfAttention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attention = nn.MultiheadAttention(8, 2, batch_first=True)

    def forward(self, x):
        return self.attention(x, x, x, need_weights=False)[0].mean(1)


@pytest.mark.parametrize("make, where, what", [
    (lambda: nn.Sequential(nn.LSTM(3, 8, batch_first=True), nn.Linear(8, 2)),
     "block 0 is an nn.LSTM", "returns a tuple"),
    (lambda: nn.Sequential(nn.Sequential(nn.GRU(3, 8, batch_first=True), nn.Flatten()),
                           nn.Linear(8, 2)),
     "block 0 (module 0 of the block) is an nn.GRU", "returns a tuple"),
    (lambda: nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.MultiheadAttention(8, 2),
                           nn.Linear(8, 2)),
     "block 1 is an nn.MultiheadAttention", "takes (query, key, value)"),
    (lambda: nn.Sequential(nn.Sequential(nn.Linear(3, 8), nn.Sequential(nn.LSTMCell(8, 8))),
                           nn.Linear(8, 2)),
     "block 0 (module 1.0 of the block) is an nn.LSTMCell", "returns a tuple (h, c)"),
    (lambda: nn.Sequential(nn.Bilinear(3, 3, 8), nn.Linear(8, 2)),
     "block 0 is an nn.Bilinear", "two inputs"),
    (lambda: nn.Sequential(nn.Sequential(nn.Conv1d(1, 2, 3), nn.MaxPool1d(2, return_indices=True)),
                           nn.Linear(2, 2)),
     "block 0 (module 1 of the block) is an nn.MaxPool1d", "return_indices=False"),
], ids=["lstm", "gru-in-sequential", "mha", "lstmcell-nested", "bilinear", "pool-indices"])
def test_modules_that_are_not_one_tensor_in_one_out_are_refused_in_the_view(make, where, what):
    network = make()
    with pytest.raises(UnsupportedNetworkError, match="Fix:") as info:
        as_blocks(network)
    assert where in str(info.value) and what in str(info.value)
    with pytest.raises(UnsupportedNetworkError):
        as_blocks(network)  # a refused network is not cached as accepted
    with pytest.raises(UnsupportedNetworkError):
        as_blocks(network, group_activations=False)


def test_the_suggested_wrappers_are_blocks():
    recurrent = nn.Sequential(_LastStep(), nn.Sequential(nn.Linear(8, 8), nn.Tanh()),
                              nn.Linear(8, 2))
    assert len(as_blocks(recurrent)) == 3
    assert feedforward(as_blocks(recurrent), torch.randn(4, 5, 3))[-1].shape == (4, 2)
    attention = nn.Sequential(_SelfAttention(), nn.Linear(8, 2))
    assert feedforward(as_blocks(attention), torch.randn(4, 5, 8))[-1].shape == (4, 2)


def _embedding_first():
    return nn.Sequential(nn.Sequential(nn.Flatten(), nn.Embedding(10, 4), nn.Flatten()),
                         nn.Linear(20, 2))


def test_an_embedding_is_accepted_only_where_the_integer_inputs_reach_it():
    assert len(as_blocks(_embedding_first())) == 2  # after parameter-free steps of block 0
    assert len(as_blocks(nn.Sequential(nn.Embedding(10, 4), nn.Flatten(), nn.Linear(20, 2)))) == 3
    later = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Embedding(8, 4), nn.Linear(4, 2))
    # the reference: torch's own error names no block and no fix
    with pytest.raises(RuntimeError, match="indices"):
        later(torch.randn(2, 3))
    with pytest.raises(UnsupportedNetworkError, match=r"block 1 is an nn.Embedding, after "
                                                      r"Linear \(block 0, module 0\)") as info:
        as_blocks(later)
    assert "integer indices" in str(info.value) and "first layer of block 0" in str(info.value)
    in_block = nn.Sequential(nn.Sequential(nn.Linear(3, 8), nn.Embedding(8, 4)), nn.Linear(4, 2))
    with pytest.raises(UnsupportedNetworkError, match=r"block 0 \(module 1 of the block\)"):
        as_blocks(in_block)
    after_free_block = nn.Sequential(nn.Flatten(), nn.Embedding(10, 4), nn.Linear(4, 2))
    with pytest.raises(UnsupportedNetworkError, match="block 1 is an nn.Embedding, after block 0"):
        as_blocks(after_free_block)  # block 1's input is a state under PC/TP


def test_a_wrapper_of_the_users_own_is_not_opened():
    class Tokens(nn.Module):  # takes floats, embeds their rounded values: its own business
        def __init__(self) -> None:
            super().__init__()
            self.embedding = nn.Embedding(10, 4)

        def forward(self, h):
            return self.embedding(h.clamp(0, 9).long()).flatten(1)

    network = nn.Sequential(nn.Linear(3, 5), Tokens(), nn.Linear(20, 2))
    assert len(as_blocks(network)) == 3
