"""Instance optimisation: adapt a registration network's answer to the one pair it registers.

Two spaces: the network's weights (:func:`instance_optimise`, uniGradICON's), or the map itself
(:func:`refine_map`: a diffeomorphic correction composed with the network's map).
"""

from __future__ import annotations

import copy
from typing import Callable, Sequence

import torch
from torch import Tensor, nn

from fmreg.core.grid import Frame, Grid
from fmreg.core.sampling import identity_points
from fmreg.errors import FmregError
from fmreg.losses.base import LossRecord
from fmreg.losses.regularization import diffusion
from fmreg.transforms.base import Transform
from fmreg.transforms.displacement import DisplacementTransform
from fmreg.transforms.sequential import SequentialTransform
from fmreg.transforms.velocity import StationaryVelocity

#: Where instance optimisation adapts the answer: the map (default) or the network's weights.
IO_SPACES = ("field", "weights")

#: Control-grid coarsening factors of the map-space levels, coarse to fine (:func:`refine_map`).
REFINE_CONTROLS = (32, 8, 2)


def io_step_size(space: str, lr: float | None, weights_lr: float, field_lr: float = 3e-3) -> float:
    """The Adam step size of instance optimisation: ``lr``, or the default of ``space``."""
    if lr is not None:
        return lr
    return weights_lr if space == "weights" else field_lr


def check_instance_options(iterations: int, lr: float, space: str = "weights", smoothness: float = 0.0) -> None:
    """One-line error for settings instance optimisation cannot use (NaN ``lr`` included)."""
    if iterations < 0 or not lr > 0:
        raise FmregError("io_iterations must be >= 0 and io_lr > 0")
    if space not in IO_SPACES:
        raise FmregError(f"unknown io_space '{space}': choose {' or '.join(IO_SPACES)}")
    if not smoothness >= 0:
        raise FmregError("io_smoothness must be >= 0")


def instance_optimise(net: nn.Module, objective: Callable[[nn.Module], LossRecord], iterations: int,
                      lr: float) -> nn.Module:
    """Adam over the weights of a copy of ``net`` (``net`` itself is left as it was).

    Args:
        net: The trained network.
        objective: The pair's loss for a network (e.g. the training loss on this pair).
        iterations: Adam steps.
        lr: Adam step size.

    Returns:
        The fine-tuned copy, in eval mode.
    """
    net = copy.deepcopy(net)
    optim = torch.optim.Adam(net.parameters(), lr=lr)
    for _ in range(iterations):
        optim.zero_grad()
        objective(net).total.backward()
        optim.step()
    return net.eval()


def refine_map(transform: Transform, shape: Sequence[int], objective: Callable[[Tensor], LossRecord],
               iterations: int, lr: float, smoothness: float = 0.1,
               controls: Sequence[int] = REFINE_CONTROLS) -> Transform:
    """Instance optimisation in map space: ``T' = T ∘ exp(v_1) ∘ … ∘ exp(v_n)``, coarse to fine.

    The network's map ``T`` stays as it is; at each level a stationary velocity on a control
    grid (``1/control`` of the input size, integrated by scaling and squaring) corrects the map
    so far in the fixed image's frame, like further, optimised, steps of the network's own
    coarse-to-fine cascade. Every pair of a batch gets its own correction.

    Args:
        transform: The network's map (``NORMALIZED`` frame of the network's input grid).
        shape: The network's input shape, array order.
        objective: ``points -> LossRecord`` to minimise, ``points`` the ``(B, *shape, ndim)``
            refined map (e.g. an image dissimilarity of the moving image sampled there).
        iterations: Adam steps in all, shared evenly by the levels (the first ones get the rest).
        lr: Adam step size, in ``NORMALIZED`` units of velocity.
        smoothness: Weight of the diffusion energy of each ``v``, its gradient in ``NORMALIZED``
            units per ``NORMALIZED`` unit (dimensionless: a uniform stretch at rate ``a`` costs
            ``smoothness · a²`` per axis).
        controls: Control-grid coarsening factor of each level, coarse to fine.

    Returns:
        The refined map, detached from autograd: at each level the iterate of lowest objective
        among those evaluated (the identity correction when no step lowers it).
    """
    shape = tuple(shape)
    for level, control in enumerate(controls):
        steps = iterations // len(controls) + (level < iterations % len(controls))
        if steps:
            transform = _refine_level(_frozen(transform, shape), shape, objective, steps, lr, smoothness, control)
    return transform


def _frozen(transform: Transform, shape: tuple[int, ...]) -> DisplacementTransform:
    """``transform`` sampled once on the ``shape`` grid, so that later levels do not re-integrate it."""
    with torch.no_grad():
        points = transform.normalized_points(shape)
        return DisplacementTransform((points - identity_points(shape)).movedim(-1, 1), Grid(shape))


def _refine_level(transform: DisplacementTransform, shape: tuple[int, ...], objective: Callable[[Tensor], LossRecord],
                  iterations: int, lr: float, smoothness: float, control: int) -> Transform:
    """One level of :func:`refine_map`: ``T ∘ exp(v)`` with ``v`` on a ``1/control`` grid."""
    domain = Grid(shape)
    control_shape = tuple(max(2, -(-n // control)) for n in shape)
    # Control spacing of the NORMALIZED frame ([-1, 1] over the first to the last point).
    spacing = [2.0 / (n - 1) for n in control_shape]
    batch = transform.displacement.shape[0]
    v = torch.zeros(batch, len(shape), *control_shape, requires_grad=True)
    optim = torch.optim.Adam([v], lr=lr)
    best, best_value = v.detach().clone(), float("inf")
    for _ in range(iterations):
        optim.zero_grad()
        refined = SequentialTransform(StationaryVelocity(v, domain, Frame.NORMALIZED), transform)
        value = objective(refined.normalized_points(shape)).total + smoothness * diffusion(v.flatten(0, 1), spacing)
        # Adam's steps are about lr whatever the gradient: keep the best iterate evaluated, so
        # that a map with nothing left to correct is not moved by steps on rounding noise.
        if float(value.detach()) < best_value:
            best, best_value = v.detach().clone(), float(value.detach())
        value.backward()
        optim.step()
    return SequentialTransform(StationaryVelocity(best, domain, Frame.NORMALIZED), transform)
