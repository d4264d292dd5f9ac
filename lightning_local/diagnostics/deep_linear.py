"""Deep linear networks: predictive coding's equilibrium in closed form (docs/math.md §4.2).

Network: ``L`` bias-free linear blocks, ``h_l = W_l h_{l-1}`` (an ``MLP(activation="identity",
bias=False)`` or any ``nn.Sequential`` of ``nn.Linear`` blocks, optionally followed by
``nn.Identity``); the output is ``f = h_L = W_{L:1} x`` with ``W_{L:i} = W_L ... W_i``
(``W_{L:L+1} = I``). Loss: ``loss(f, y) = 1/2 ||f - y||^2`` per sample, residual ``r = f - y``.

Energy (the library's convention, :mod:`lightning_local.rules.predictive_coding`), per sample,
summed over the batch::

    F(x) = sum_{l<L} (gamma_l / 2) ||x_l - mu_l||^2 + gamma_L * 1/2 ||mu_L - y||^2,
    mu_l = W_l x_{l-1},  eps_l = x_l - mu_l,  x_0 = input.

Stationarity ``dF/dx_l = 0`` gives ``gamma_l eps_l = gamma_{l+1} W_{l+1}^T eps_{l+1}`` with
``gamma_L eps_L = -gamma_L (mu_L - y)``. Unrolling, ``mu_L = f + C eps_L`` and the unique
minimum (F is strictly convex in the states when every ``gamma_l > 0``) is::

    mu_L* - y = (I + C)^{-1} (W_{L:1} x - y)
    eps_l*    = -(gamma_L / gamma_l) W_{L:l+1}^T (I + C)^{-1} (W_{L:1} x - y),   l < L
    C         = sum_{i=2..L} (gamma_L / gamma_{i-1}) W_{L:i} W_{L:i}^T   (n_L x n_L, PSD)
    F*        = (gamma_L / 2) sum_b r_b^T (I + C)^{-1} r_b

(The paper, Thm. 4.2, writes ``e_l* = -eps_l*``, the error as prediction minus state; see
docs/math.md §0.4.) Equivalently the hidden errors are the perturbations ``delta_l = eps_l`` of
minimal ``sum_l gamma_l ||delta_l||^2`` with the output softly pulled to ``y``: as ``C -> inf``
the whole residual is redistributed over the layers (Gauss-Newton-like), as ``C -> 0``
``eps_l* -> -(gamma_L/gamma_l) W_{L:l+1}^T r`` (gradient-like).

Weight updates compared here, each as a *gradient* (the update is minus a step size times it),
batch means, one ``(fan_out, fan_in)`` matrix per layer, with ``J_l = W_{L:l+1}`` (``J_L = I``)
and ``h_l`` the feedforward activations:

- GD: ``dL/dW_l = mean_b J_l^T r_b h_{l-1,b}^T`` for ``L = mean_b 1/2 ||f_b - y_b||^2``.
- GNT (Gauss-Newton target, as in Meulemans et al. 2020 and the paper): every layer gets the
  minimum-norm target that moves the output onto ``y`` by itself,
  ``tau_l = h_l - J_l^+ r`` (``J_l^+`` the Moore-Penrose pseudo-inverse; ``tau_L = y``),
  and regresses to it with the local loss ``1/2 ||tau_l - W_l h_{l-1}||^2``, whose gradient is
  ``mean_b J_l^+ r_b h_{l-1,b}^T``. The readout's GNT update equals its GD update.
- PC at equilibrium, ``dF/dW_l / B``: ``-gamma_l mean_b eps_l* x_{l-1}*^T`` for ``l < L`` and
  ``gamma_L mean_b (mu_L* - y) x_{L-1}*^T`` for the readout, i.e.
  ``gamma_L mean_b J_l^T (I + C)^{-1} r_b x_{l-1,b}*^T`` for every layer. With the fixed
  prediction assumption (the rule's ``fixed_prediction=True``) the rule instead uses the
  feedforward inputs and predictions: ``-gamma_l mean_b (x_l* - h_l) h_{l-1}^T`` and
  ``gamma_L mean_b r_b h_{L-1,b}^T``.

Cosines are taken per layer (a per-layer cosine does not depend on the per-layer learning
rates a parametrization sets). The readout's GD and GNT updates coincide, so the hidden layers
are where GD and GNT differ.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from lightning_local.diagnostics.alignment import update_alignment
from lightning_local.errors import LocalLearningError, UnsupportedNetworkError
from lightning_local.losses import OutputLoss
from lightning_local.network import as_blocks, feedforward

__all__ = [
    "LinearEquilibrium",
    "UpdateComparison",
    "linear_weights",
    "output_jacobians",
    "pc_gram_matrix",
    "linear_equilibrium",
    "gd_gradients",
    "gnt_gradients",
    "pc_gradients",
    "layer_cosines",
    "compare_updates",
]

_MSE = OutputLoss("mse")
Network = nn.Module | Sequence[nn.Module]


@dataclass
class LinearEquilibrium:
    """PC's equilibrium on a batch of a deep linear network, in closed form.

    Attributes:
        states: ``[x_0, x_1*, .., x_{L-1}*]`` (``x_0`` is the input), rows are samples.
        errors: ``[eps_1*, .., eps_{L-1}*]``, ``eps_l* = x_l* - W_l x_{l-1}*``.
        output_residual: ``mu_L* - y = (I + C)^{-1} (f - y)``, one row per sample.
        feedforward: ``[h_0, .., h_L]``; ``h_L = f``.
        gram: the matrix ``C`` (outputs x outputs).
        energy: ``F`` at the equilibrium, summed over the batch.
    """

    states: list[Tensor]
    errors: list[Tensor]
    output_residual: Tensor
    feedforward: list[Tensor]
    gram: Tensor
    energy: Tensor


@dataclass
class UpdateComparison:
    """GD, GNT and PC gradients of one batch with their per-layer cosines.

    Attributes:
        gd, gnt, pc: one gradient matrix per layer (see the module docstring).
        cos_pc_gd, cos_pc_gnt: per-layer cosines, shape ``(L,)``.
        gram_norm: spectral norm ``||C||_2``.
    """

    gd: list[Tensor]
    gnt: list[Tensor]
    pc: list[Tensor]
    cos_pc_gd: Tensor
    cos_pc_gnt: Tensor
    gram_norm: float

    @property
    def hidden_cos_pc_gd(self) -> float:
        """Mean over the non-readout layers of ``cos(PC, GD)``."""
        return float(self.cos_pc_gd[:-1].mean())

    @property
    def hidden_cos_pc_gnt(self) -> float:
        """Mean over the non-readout layers of ``cos(PC, GNT)``."""
        return float(self.cos_pc_gnt[:-1].mean())


def linear_weights(network: Network) -> list[Tensor]:
    """``[W_1, .., W_L]`` (detached, ``(fan_out, fan_in)``) of a bias-free linear network.

    Each block must be an ``nn.Linear`` without bias, or an ``nn.Sequential`` holding exactly one
    such ``nn.Linear`` and otherwise only ``nn.Identity``; the block's output is checked to be
    ``x W^T`` on a probe (this catches activations and output multipliers).

    Raises:
        UnsupportedNetworkError: for a block with a bias, a non-identity activation or anything
            that is not a single linear map.
    """
    weights = []
    for index, block in enumerate(as_blocks(network)):
        linears = [m for m in block.modules() if isinstance(m, nn.Linear)]
        others = [
            m for m in block.modules()
            if not isinstance(m, (nn.Linear, nn.Identity, nn.Sequential))
        ]
        if len(linears) != 1 or others:
            raise UnsupportedNetworkError(
                f"block {index} ({type(block).__name__}) is not a single linear map: it holds "
                f"{len(linears)} nn.Linear and {[type(m).__name__ for m in others]}. The deep "
                "linear closed form needs linear blocks. Fix: build the network with "
                "MLP(activation='identity', bias=False) or nn.Sequential of nn.Linear blocks."
            )
        linear = linears[0]
        if linear.bias is not None:
            raise UnsupportedNetworkError(
                f"block {index} has a bias; the deep linear closed form assumes none. Fix: "
                "build the network with bias=False."
            )
        weight = linear.weight.detach()
        with torch.no_grad():
            probe = torch.linspace(-1.0, 1.0, 2 * weight.shape[1], dtype=weight.dtype,
                                   device=weight.device).reshape(2, -1)
            if not torch.allclose(block(probe), probe @ weight.T, rtol=1e-5, atol=1e-6):
                raise UnsupportedNetworkError(
                    f"block {index} does not compute x W^T with its nn.Linear weight (an output "
                    "multiplier or a custom forward?). Fix: fold any multiplier into the weight."
                )
        weights.append(weight)
    return weights


def output_jacobians(weights: Sequence[Tensor]) -> list[Tensor]:
    """``[J_1, .., J_L]`` with ``J_l = d f / d h_l = W_{L:l+1}`` (``J_L = I``), each ``C x M_l``."""
    identity = torch.eye(weights[-1].shape[0], dtype=weights[-1].dtype, device=weights[-1].device)
    jacobians = [identity]
    for weight in reversed(weights[1:]):
        jacobians.append(jacobians[-1] @ weight)
    return jacobians[::-1]


def _energy_weights(
    layers: int, output_weight: float, hidden_weights: float | Sequence[float]
) -> list[float]:
    """``[gamma_1, .., gamma_{L-1}, gamma_L]``, all positive."""
    if isinstance(hidden_weights, (int, float)):
        hidden = [float(hidden_weights)] * (layers - 1)
    else:
        hidden = [float(value) for value in hidden_weights]
        if len(hidden) != layers - 1:
            raise LocalLearningError(
                f"hidden_weights has {len(hidden)} entries but the network has {layers - 1} "
                "hidden layers. Fix: give one value per hidden layer, or a single number."
            )
    gammas = hidden + [float(output_weight)]
    if not all(gamma > 0 for gamma in gammas):
        raise LocalLearningError(
            f"energy weights must be positive for the closed form, got {gammas}. Fix: use "
            "gamma_l > 0 and gamma_L > 0."
        )
    return gammas


def _weights_of(network: Network | Sequence[Tensor]) -> list[Tensor]:
    if isinstance(network, Sequence) and all(isinstance(w, Tensor) for w in network):
        return [w.detach() for w in network]
    return linear_weights(network)


def pc_gram_matrix(
    network: Network | Sequence[Tensor],
    output_weight: float = 1.0,
    hidden_weights: float | Sequence[float] = 1.0,
) -> Tensor:
    """``C = sum_{i=2..L} (gamma_L / gamma_{i-1}) W_{L:i} W_{L:i}^T`` (outputs x outputs).

    ``network`` is a linear network or its list of weights ``[W_1, .., W_L]``.
    """
    weights = _weights_of(network)
    gammas = _energy_weights(len(weights), output_weight, hidden_weights)
    jacobians = output_jacobians(weights)
    gram = torch.zeros_like(jacobians[-1])
    for gamma, jacobian in zip(gammas[:-1], jacobians[:-1]):
        gram = gram + (gammas[-1] / gamma) * (jacobian @ jacobian.T)
    return gram


def _residual(output: Tensor, targets: Tensor) -> Tensor:
    """``f - y`` with class labels one-hot encoded (the MSE convention of the library)."""
    return output - _MSE.target_matrix(output, targets)


@dataclass
class _Pass:
    """Weights, feedforward activations ``[h_0 .. h_L]`` and residual ``f - y`` of a batch."""

    weights: list[Tensor]
    activations: list[Tensor]
    residual: Tensor


def _forward(network: Network, inputs: Tensor, targets: Tensor) -> _Pass:
    weights = linear_weights(network)
    with torch.no_grad():
        activations = feedforward(as_blocks(network), inputs)
    return _Pass(weights, activations, _residual(activations[-1], targets))


def _gd(state: _Pass) -> list[Tensor]:
    batch = state.residual.shape[0]
    return [
        (state.residual @ jacobian).T @ h / batch
        for jacobian, h in zip(output_jacobians(state.weights), state.activations[:-1])
    ]


def _pseudo_inverse(jacobian: Tensor) -> Tensor:
    """``J^+ = J^T (J J^T)^+``: one small (outputs x outputs) pseudo-inverse per layer."""
    return jacobian.T @ torch.linalg.pinv(jacobian @ jacobian.T, hermitian=True)


def _gnt(state: _Pass) -> list[Tensor]:
    batch = state.residual.shape[0]
    return [
        (state.residual @ _pseudo_inverse(jacobian).T).T @ h / batch
        for jacobian, h in zip(output_jacobians(state.weights), state.activations[:-1])
    ]


def _pc(
    state: _Pass,
    equilibrium: LinearEquilibrium,
    gammas: Sequence[float],
    fixed_prediction: bool,
) -> list[Tensor]:
    batch = state.residual.shape[0]
    h = state.activations
    if fixed_prediction:
        hidden = [
            -gamma * (x - h_l).T @ h_prev / batch
            for gamma, x, h_l, h_prev in zip(gammas, equilibrium.states[1:], h[1:-1], h[:-2])
        ]
        readout = gammas[-1] * state.residual.T @ h[-2] / batch
    else:
        hidden = [
            -gamma * error.T @ x_prev / batch
            for gamma, error, x_prev in zip(gammas, equilibrium.errors, equilibrium.states[:-1])
        ]
        readout = gammas[-1] * equilibrium.output_residual.T @ equilibrium.states[-1] / batch
    return hidden + [readout]


def _equilibrium(state: _Pass, gammas: Sequence[float]) -> LinearEquilibrium:
    with torch.no_grad():
        gram = pc_gram_matrix(state.weights, gammas[-1], gammas[:-1])
        identity = torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
        # rows: (mu_L* - y)_b = (I + C)^{-1} r_b, with (I + C) symmetric
        damped = torch.linalg.solve(identity + gram, state.residual.T).T
        jacobians = output_jacobians(state.weights)
        errors = [
            -(gammas[-1] / gamma) * damped @ jacobian
            for gamma, jacobian in zip(gammas[:-1], jacobians[:-1])
        ]
        states = [state.activations[0]]
        for weight, error in zip(state.weights[:-1], errors):
            states.append(states[-1] @ weight.T + error)
        energy = 0.5 * gammas[-1] * (state.residual * damped).sum()
    return LinearEquilibrium(states, errors, damped, state.activations, gram, energy)


def linear_equilibrium(
    network: Network,
    inputs: Tensor,
    targets: Tensor,
    output_weight: float = 1.0,
    hidden_weights: float | Sequence[float] = 1.0,
) -> LinearEquilibrium:
    """The minimum of PC's energy over the hidden states, in closed form (module docstring).

    ``targets`` are class labels (one-hot encoded) or float targets of the output's shape.
    """
    state = _forward(network, inputs, targets)
    gammas = _energy_weights(len(state.weights), output_weight, hidden_weights)
    return _equilibrium(state, gammas)


def gd_gradients(network: Network, inputs: Tensor, targets: Tensor) -> list[Tensor]:
    """``dL/dW_l = mean_b J_l^T r_b h_{l-1,b}^T`` for ``L = mean_b 1/2 ||f_b - y_b||^2``."""
    return _gd(_forward(network, inputs, targets))


def gnt_gradients(network: Network, inputs: Tensor, targets: Tensor) -> list[Tensor]:
    """Gauss-Newton-target gradients ``mean_b J_l^+ r_b h_{l-1,b}^T`` (module docstring).

    ``J_l^+ = J_l^T (J_l J_l^T)^+`` is the pseudo-inverse: the minimum-norm ``delta_l`` with
    ``J_l delta_l = r`` (the least-squares one when layer ``l`` is narrower than the output).
    """
    return _gnt(_forward(network, inputs, targets))


def pc_gradients(
    network: Network,
    inputs: Tensor,
    targets: Tensor,
    output_weight: float = 1.0,
    hidden_weights: float | Sequence[float] = 1.0,
    fixed_prediction: bool = False,
) -> list[Tensor]:
    """PC's weight gradients ``dF/dW_l / B`` at the closed-form equilibrium.

    Without FPA: ``-gamma_l mean_b eps_l* x_{l-1}*^T`` (hidden) and
    ``gamma_L mean_b (mu_L* - y) x_{L-1}*^T`` (readout). With FPA (``fixed_prediction=True``,
    the rule's default) the inputs and predictions are the feedforward ones:
    ``-gamma_l mean_b (x_l* - h_l) h_{l-1}^T`` and ``gamma_L mean_b (f - y) h_{L-1}^T``.
    Beyond two layers FPA at equilibrium is *not* gradient descent as ``C -> 0``:
    ``x_l* - h_l = eps_l* + W_l (x_{l-1}* - h_{l-1})`` carries the errors of the layers below.
    """
    state = _forward(network, inputs, targets)
    gammas = _energy_weights(len(state.weights), output_weight, hidden_weights)
    return _pc(state, _equilibrium(state, gammas), gammas, fixed_prediction)


def layer_cosines(first: Sequence[Tensor], second: Sequence[Tensor]) -> Tensor:
    """Per-layer cosine similarity of two lists of matrices (0 where one of them is 0).

    ``cos_l = <A_l, B_l>_F / (||A_l||_F ||B_l||_F)``, computed by
    :func:`lightning_local.diagnostics.alignment.update_alignment` with one matrix per layer.
    """
    if len(first) != len(second):
        raise LocalLearningError(
            f"cannot compare {len(first)} layers with {len(second)}. Fix: pass one matrix per "
            "layer of the same network for both updates."
        )
    return update_alignment([[a] for a in first], list(first), list(second), measure="cosine")


def compare_updates(
    network: Network,
    inputs: Tensor,
    targets: Tensor,
    output_weight: float = 1.0,
    hidden_weights: float | Sequence[float] = 1.0,
    fixed_prediction: bool = False,
) -> UpdateComparison:
    """GD, GNT and equilibrium-PC gradients of a batch, their per-layer cosines and ``||C||``."""
    state = _forward(network, inputs, targets)
    gammas = _energy_weights(len(state.weights), output_weight, hidden_weights)
    equilibrium = _equilibrium(state, gammas)
    gd, gnt = _gd(state), _gnt(state)
    pc = _pc(state, equilibrium, gammas, fixed_prediction)
    return UpdateComparison(
        gd=gd,
        gnt=gnt,
        pc=pc,
        cos_pc_gd=layer_cosines(pc, gd),
        cos_pc_gnt=layer_cosines(pc, gnt),
        gram_norm=float(torch.linalg.matrix_norm(equilibrium.gram, ord=2)),
    )
