"""Instance optimisation: adapt a registration network's answer to the one pair it registers.

Two spaces: the network's weights (:func:`instance_optimise`, uniGradICON's), or the map itself
(:func:`refine_map`: a diffeomorphic correction composed with the network's map); or the first
and then the second.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
from torch import Tensor, nn

from fmreg.core.grid import Frame, Grid
from fmreg.core.sampling import identity_points, sample_normalized
from fmreg.errors import FmregError
from fmreg.losses.base import LossRecord
from fmreg.losses.image import GaussianLNCC
from fmreg.losses.regularization import diffusion
from fmreg.transforms.base import Transform
from fmreg.transforms.displacement import DisplacementTransform
from fmreg.transforms.sequential import SequentialTransform
from fmreg.transforms.velocity import StationaryVelocity

#: Where instance optimisation adapts the answer: the map, the network's weights, or the
#: weights and then the map.
IO_SPACES = ("field", "weights", "both")

#: Control-grid coarsening factors of the map-space levels, coarse to fine (:func:`refine_map`).
REFINE_CONTROLS = (32, 8, 2)

#: Default Adam step size of the map-space correction (``NORMALIZED`` units of velocity).
FIELD_LR = 3e-3


@dataclass(frozen=True)
class InstanceOptions:
    """Instance-optimisation settings of a network method.

    Attributes:
        iterations: Adam steps of each stage (0: the network alone).
        space: One of :data:`IO_SPACES`.
        weights_lr: Step size over the network's weights.
        field_lr: Step size over the map's correction.
        smoothness: Weight of the correction's diffusion energy (:func:`refine_map`).
    """

    iterations: int
    space: str
    weights_lr: float
    field_lr: float
    smoothness: float

    @property
    def tunes_weights(self) -> bool:
        return self.iterations > 0 and self.space in ("weights", "both")

    @property
    def refines_map(self) -> bool:
        return self.iterations > 0 and self.space in ("field", "both")

    @property
    def lr(self) -> float:
        """The step size ``io_lr`` sets: the field's in ``field`` space, else the weights'."""
        return self.field_lr if self.space == "field" else self.weights_lr

    def parameters(self) -> dict[str, Any]:
        return {"io_iterations": self.iterations, "io_space": self.space, "io_lr": self.lr,
                "io_smoothness": self.smoothness}


#: The instance-optimisation parameters of the network methods (``io_lr`` each method states).
IO_PARAMS = {
    "io_iterations": (">= 0", "instance-optimisation steps on the pair, per stage (0: the network alone)"),
    "io_space": (IO_SPACES, "adapt a correction of the network's map (field: 1 - LNCC of the pair at the fixed "
                            "image's resolution, up to 4x the network's voxels), the network's weights (weights: its "
                            "training loss on the pair, uniGradICON's), or the weights and then the map (both)"),
    "io_smoothness": (">= 0", "field and both: weight of the map correction's diffusion energy"),
}


def instance_options(iterations: int, space: str, lr: float | None, smoothness: float,
                     weights_lr: float) -> InstanceOptions:
    """Checked :class:`InstanceOptions`; one-line error for settings that cannot be used (NaN included).

    Args:
        iterations, space, smoothness: As :class:`InstanceOptions`.
        lr: The step size of the weights (``weights``, ``both``) or of the map (``field``);
            None: the default (``weights_lr``, or :data:`FIELD_LR`). The map stage of ``both``
            always takes :data:`FIELD_LR`.
        weights_lr: The method's default step size over its weights.
    """
    if iterations < 0 or not (lr is None or lr > 0):
        raise FmregError("io_iterations must be >= 0 and io_lr > 0")
    if space not in IO_SPACES:
        raise FmregError(f"unknown io_space '{space}': choose {', '.join(IO_SPACES[:-1])} or {IO_SPACES[-1]}")
    if not smoothness >= 0:
        raise FmregError("io_smoothness must be >= 0")
    if lr is not None:
        weights_lr, field_lr = (weights_lr, lr) if space == "field" else (lr, FIELD_LR)
    else:
        field_lr = FIELD_LR
    return InstanceOptions(iterations, space, weights_lr, field_lr, smoothness)


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
               controls: Sequence[float] = REFINE_CONTROLS) -> Transform:
    """Instance optimisation in map space: ``T' = T ∘ exp(v_1) ∘ … ∘ exp(v_n)``, coarse to fine.

    The network's map ``T`` stays as it is; at each level a stationary velocity on a control
    grid (``1/control`` of the input size, integrated by scaling and squaring) corrects the map
    so far in the fixed image's frame, like further, optimised, steps of the network's own
    coarse-to-fine cascade. Every pair of a batch gets its own correction.

    Args:
        transform: The network's map (``NORMALIZED`` frames, fixed → moving).
        shape: The grid the objective's points lie on (the network's input or a finer one),
            array order.
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


def refine_on_images(transform: Transform, fixed: Tensor, moving: Tensor, size: Sequence[int], iterations: int,
                     lr: float, smoothness: float = 0.1, sigma: float = 5.0) -> Transform:
    """:func:`refine_map` with ``1 − LNCC`` of the pair as the objective, on a finer grid than
    the network's.

    The window and the control grids keep their extent relative to the image: on images ``r``
    times the network's input size (mean over axes), the Gaussian window is ``r · sigma``
    voxels and the control-grid factors are ``r ·`` :data:`REFINE_CONTROLS`, so the objective is
    the network-size one sampled finer.

    Args:
        transform: The network's map (``NORMALIZED`` frames, fixed → moving).
        fixed, moving: ``(B, 1, *io_shape)`` intensities (e.g. :func:`fmreg.nn.images.refinement_inputs`).
        size: The network's input shape, array order.
        iterations, lr, smoothness: As :func:`refine_map`.
        sigma: LNCC window at the network's input size, voxels.

    Returns:
        The refined map (as :func:`refine_map`).
    """
    shape = tuple(fixed.shape[2:])
    r = sum(n / s for n, s in zip(shape, size)) / len(size)
    similarity = GaussianLNCC(sigma * r)

    def objective(points: Tensor) -> LossRecord:
        return similarity(sample_normalized(moving, points, padding="border"), fixed)

    return refine_map(transform, shape, objective, iterations, lr, smoothness, tuple(c * r for c in REFINE_CONTROLS))


def _frozen(transform: Transform, shape: tuple[int, ...]) -> DisplacementTransform:
    """``transform`` sampled once on the ``shape`` grid, so that later levels do not re-integrate it."""
    with torch.no_grad():
        points = transform.normalized_points(shape)
        return DisplacementTransform((points - identity_points(shape)).movedim(-1, 1), Grid(shape))


def _refine_level(transform: DisplacementTransform, shape: tuple[int, ...], objective: Callable[[Tensor], LossRecord],
                  iterations: int, lr: float, smoothness: float, control: float) -> Transform:
    """One level of :func:`refine_map`: ``T ∘ exp(v)`` with ``v`` on a ``1/control`` grid."""
    domain = Grid(shape)
    control_shape = tuple(max(2, math.ceil(n / control)) for n in shape)
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
