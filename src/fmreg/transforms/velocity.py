"""Stationary velocity fields: ``T = exp(v)`` by scaling and squaring (diffeomorphic)."""

from __future__ import annotations

import math
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


def automatic_steps(velocity: Tensor, shape: Sequence[int], most: int) -> int:
    """The fewest squarings that scale ``velocity`` under half a voxel everywhere, at most ``most``.

    The first step takes ``exp(v / 2^N) ≈ id + v / 2^N``, which is invertible while the scaled
    field moves no point by more than about half a voxel (ITK's automatic rule for its
    exponential of a displacement field); each further squaring costs as much as a warp of the
    field and adds interpolation error.

    Args:
        velocity: ``(B, *shape, ndim)`` normalized velocity (only its size is read).
        shape: The grid shape, array order.
        most: Upper bound.
    """
    # Normalized units → voxels: the grid spans 2 normalized units over n - 1 voxels.
    per_voxel = torch.tensor([(n - 1) / 2.0 for n in reversed(tuple(shape))], dtype=velocity.dtype)
    largest = float((velocity.detach() * per_voxel).norm(dim=-1).max()) if velocity.numel() else 0.0
    if not math.isfinite(largest):
        return most
    return min(most, max(0, math.ceil(math.log2(largest / 0.5)))) if largest > 0.5 else 0


def resize_vectors(u: Tensor, shape: Sequence[int]) -> Tensor:
    """Linearly resize a channels-last ``(B, *s, ndim)`` normalized field to ``(B, *shape, ndim)``.

    Normalized units do not depend on the number of voxels, so no rescaling is needed.
    """
    shape = tuple(shape)
    if tuple(u.shape[1:-1]) == shape:
        return u
    mode = "trilinear" if len(shape) == 3 else "bilinear"
    return F.interpolate(u.movedim(-1, 1), size=shape, mode=mode, align_corners=True).movedim(1, -1)


def slicewise_scaling_and_squaring(velocity: Tensor, axis: int, steps: int, identity: Tensor | None = None) -> Tensor:
    """:func:`scaling_and_squaring` of a 3D velocity that does not move along array ``axis``.

    Such a field never carries a point off its slice, so each slice is integrated on its own in
    2D: the same displacement as 3D integration (trilinear sampling at a slice's own position is
    bilinear) at about a quarter of the cost.

    Args:
        velocity: ``(B, *shape, 3)`` normalized velocity; its component along ``axis`` is ignored.
        axis: Array axis (0, 1 or 2 of ``shape``) of no motion.
        steps: Number of squarings.
        identity: ``identity_points`` of the in-plane shape, when the caller has it already.

    Returns:
        ``(B, *shape, 3)`` normalized displacement, zero along ``axis``.
    """
    comp = 2 - axis  # components are x, y, z: reversed array order
    keep = [c for c in range(3) if c != comp]  # still x-then-y for the in-plane array axes
    v = velocity.movedim(axis + 1, 1)  # (B, S, P, Q, 3)
    b, s, p, q = v.shape[:4]
    u = scaling_and_squaring(v[..., keep].reshape(b * s, p, q, 2), steps, identity).reshape(b, s, p, q, 2)
    out = torch.zeros_like(v)
    out[..., keep] = u
    return out.movedim(1, axis + 1)


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
        in_plane_axis: 3D only: an array axis of the domain along which the transform does not
            move (the slice axis of a stack). The velocity's component along it is dropped and
            every slice is integrated on its own (:func:`slicewise_scaling_and_squaring`).
        automatic_steps: ``steps`` is a maximum: a small velocity gets fewer
            (:func:`automatic_steps`).
    """

    def __init__(
        self,
        velocity: Tensor,
        domain: Grid,
        frame: Frame | str = Frame.PHYSICAL,
        steps: int = 7,
        in_plane_axis: int | None = None,
        automatic_steps: bool = False,
    ) -> None:
        super().__init__(domain)
        if in_plane_axis is not None and domain.ndim != 3:
            raise ValueError("in_plane_axis needs a 3D domain")
        self.velocity = velocity
        self.frame = Frame(frame)
        self.steps = steps
        self.in_plane_axis = in_plane_axis
        self.automatic_steps = automatic_steps
        self.control_grid = domain.resized(velocity.shape[-domain.ndim:])
        m = self.control_grid.frame_matrix(self.frame, Frame.NORMALIZED)[: domain.ndim, : domain.ndim]
        self._to_normalized = torch.as_tensor(m, dtype=torch.float32)
        shape = self.control_grid.shape
        if in_plane_axis is not None:
            shape = [n for a, n in enumerate(shape) if a != in_plane_axis]
        self._identity = identity_points(shape)

    def normalized_velocity(self) -> Tensor:
        """``(B, *control_shape, ndim)`` velocity in normalized units."""
        v = self.velocity if self.velocity.dim() == self.ndim + 2 else self.velocity[None]
        return torch.einsum("ij,bj...->b...i", self._to_normalized, v)

    def displacement(self) -> Tensor:
        """``(B, *control_shape, ndim)`` normalized displacement of ``exp(v)`` on the control grid."""
        v = self.normalized_velocity()
        steps = self.steps if not self.automatic_steps else automatic_steps(v, self.control_grid.shape, self.steps)
        if self.in_plane_axis is not None:
            return slicewise_scaling_and_squaring(v, self.in_plane_axis, steps, self._identity)
        return scaling_and_squaring(v, steps, self._identity)

    def normalized_points(self, shape: Sequence[int] | None = None) -> Tensor:
        shape = tuple(self.domain.shape if shape is None else shape)
        return self.identity_points(shape) + resize_vectors(self.displacement(), shape)

    def map_normalized(self, points: Tensor) -> Tensor:
        return points + sample_vectors(self.displacement(), points)

    def inverse(self) -> "StationaryVelocity":
        """``exp(-v)``: exact up to the integration's interpolation error."""
        return StationaryVelocity(-self.velocity, self.domain, self.frame, self.steps, self.in_plane_axis,
                                  self.automatic_steps)
