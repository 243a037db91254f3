"""Stationary velocity fields: ``T = exp(v)`` by scaling and squaring (diffeomorphic)."""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from fmreg.core.grid import Frame, Grid
from fmreg.core.sampling import identity_points, sample_vectors
from fmreg.transforms.base import Transform


def scaling_and_squaring(velocity: Tensor, steps: int, identity: Tensor | None = None) -> Tensor:
    """Displacement of ``exp(v)`` for a stationary velocity ``v``.

    Args:
        velocity: ``(B, *shape, ndim)`` velocity in normalized units of its grid.
        steps: Number of squarings (the velocity is first divided by ``2**steps``).
        identity: ``identity_points(shape)``, when the caller has it already.

    Returns:
        ``(B, *shape, ndim)`` displacement in normalized units.
    """
    ident = identity_points(velocity.shape[1:-1], velocity.dtype) if identity is None else identity
    u = velocity / (2**steps)
    for _ in range(steps):
        u = u + sample_vectors(u, ident + u)
    return u


def resize_vectors(u: Tensor, shape: Sequence[int]) -> Tensor:
    """Linearly resize a channels-last ``(B, *s, ndim)`` normalized field to ``(B, *shape, ndim)``.

    Normalized units do not depend on the number of voxels, so no rescaling is needed.
    """
    shape = tuple(shape)
    if tuple(u.shape[1:-1]) == shape:
        return u
    mode = "trilinear" if len(shape) == 3 else "bilinear"
    return F.interpolate(u.movedim(-1, 1), size=shape, mode=mode, align_corners=True).movedim(1, -1)


class StationaryVelocity(Transform):
    """``T = exp(v)`` with ``v`` given on a control grid spanning the domain.

    The velocity is integrated on its own (control) grid, where the cost is, and the
    displacement is interpolated linearly to the grid it is evaluated on.

    Args:
        velocity: ``(ndim, *control_shape)`` or ``(B, ndim, *control_shape)``, components
            ``x, y[, z]``, in units of ``frame``.
        domain: The fixed grid; the control grid is ``domain.resized(control_shape)``.
        frame: ``PHYSICAL`` (mm along world axes) or ``NORMALIZED``.
        steps: Scaling-and-squaring steps.
    """

    def __init__(self, velocity: Tensor, domain: Grid, frame: Frame | str = Frame.PHYSICAL, steps: int = 7) -> None:
        super().__init__(domain)
        self.velocity = velocity
        self.frame = Frame(frame)
        self.steps = steps
        self.control_grid = domain.resized(velocity.shape[-domain.ndim:])
        m = self.control_grid.frame_matrix(self.frame, Frame.NORMALIZED)[: domain.ndim, : domain.ndim]
        self._to_normalized = torch.as_tensor(m, dtype=torch.float32)
        self._identity = identity_points(self.control_grid.shape)

    def normalized_velocity(self) -> Tensor:
        """``(B, *control_shape, ndim)`` velocity in normalized units."""
        v = self.velocity if self.velocity.dim() == self.ndim + 2 else self.velocity[None]
        return torch.einsum("ij,bj...->b...i", self._to_normalized, v)

    def displacement(self) -> Tensor:
        """``(B, *control_shape, ndim)`` normalized displacement of ``exp(v)`` on the control grid."""
        return scaling_and_squaring(self.normalized_velocity(), self.steps, self._identity)

    def normalized_points(self, shape: Sequence[int] | None = None) -> Tensor:
        shape = tuple(self.domain.shape if shape is None else shape)
        return self.identity_points(shape) + resize_vectors(self.displacement(), shape)

    def map_normalized(self, points: Tensor) -> Tensor:
        return points + sample_vectors(self.displacement(), points)

    def inverse(self) -> "StationaryVelocity":
        """``exp(-v)``: exact up to the integration's interpolation error."""
        return StationaryVelocity(-self.velocity, self.domain, self.frame, self.steps)
