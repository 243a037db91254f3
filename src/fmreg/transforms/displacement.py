"""Displacement fields: the transform convention, warping, composition, inversion, Jacobians.

**The convention (the one place it is stated).** A registration result is a transform ``T``
that maps *fixed-image* physical points to *moving-image* physical points,
``T(x) = x + u(x)``, with ``u`` sampled on the fixed grid. Warping pulls back: the warped
image on the fixed grid is ``moving(T(x))``. This is ITK's ``DisplacementFieldTransform``
as used by ``sitk.Resample(moving, fixed, transform)``, so ``ddf.nii.gz`` written by
:func:`fmreg.io.fields.write_field` loads unchanged in SimpleITK / ITK / 3D Slicer.

A :class:`DisplacementField` carries its frame (:class:`fmreg.core.grid.Frame`); its components
are always in ``(x, y[, z])`` order (see :mod:`fmreg.core.grid`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from fmreg.core.grid import Frame, Grid
from fmreg.core.sampling import sample, sample_vectors
from fmreg.errors import FmregError
from fmreg.transforms.base import Transform
from fmreg.transforms.velocity import resize_vectors


@dataclass
class DisplacementField:
    """A displacement ``u`` on a grid.

    Attributes:
        data: ``(ndim, *grid.shape)`` float tensor; channel ``k`` is the ``k``-th component in
            ``(x, y[, z])`` order, in units of :attr:`frame`.
        grid: The (fixed-image) grid the field is sampled on.
        frame: ``PHYSICAL`` (mm, world axes), ``VOXEL`` (index units of :attr:`grid`) or
            ``NORMALIZED`` (``grid_sample`` units of :attr:`grid`).
    """

    data: Tensor
    grid: Grid
    frame: Frame = Frame.PHYSICAL

    def __post_init__(self) -> None:
        self.frame = Frame(self.frame)
        expected = (self.grid.ndim, *self.grid.shape)
        if tuple(self.data.shape) != expected:
            raise FmregError(f"displacement field has shape {tuple(self.data.shape)}, expected {expected}")

    @staticmethod
    def identity(grid: Grid, frame: Frame = Frame.PHYSICAL) -> "DisplacementField":
        return DisplacementField(torch.zeros((grid.ndim, *grid.shape)), grid, frame)

    def to(self, frame: Frame | str) -> "DisplacementField":
        """The same field expressed in another frame."""
        frame = Frame(frame)
        if frame == self.frame:
            return self
        vec = self.grid.convert_vectors(self.data.movedim(0, -1).double(), self.frame, frame)
        return DisplacementField(vec.movedim(-1, 0).to(self.data.dtype), self.grid, frame)

    def transform(self) -> "DisplacementTransform":
        """This field as a :class:`DisplacementTransform` (``T(x) = x + u(x)``)."""
        return DisplacementTransform.from_field(self)

    def mapped_points(self, frame: Frame | str = Frame.PHYSICAL) -> Tensor:
        """``T(x)`` for every voxel ``x`` of the grid: ``(ndim, *shape)``, in ``frame`` of the grid."""
        frame = Frame(frame)
        return self.grid.coordinates(frame, dtype=self.data.dtype) + self.to(frame).data

    def map_points(self, points: Tensor) -> Tensor:
        """``T(p) = p + u(p)`` of ``(N, ndim)`` physical points (mm, components ``(x, y[, z])``),
        in their dtype; points off the grid take the nearest border displacement."""
        u = sample(self.to(Frame.PHYSICAL).data, self.grid, points.T.contiguous(), mode="linear", fill=None)
        return points + u.T.to(points.dtype)


# ---------------------------------------------------------------------------- algebra
def compose(outer: DisplacementField, inner: DisplacementField) -> DisplacementField:
    """The field of ``T_outer ∘ T_inner`` on ``inner.grid``, in physical units.

    Warping with the result equals warping with ``outer`` first and then ``inner``
    (pull-back order): ``c(x) = u_inner(x) + u_outer(x + u_inner(x))``.
    """
    u_in = inner.to(Frame.PHYSICAL)
    u_out = outer.to(Frame.PHYSICAL)
    pts = u_in.mapped_points(Frame.PHYSICAL)
    # Outside the outer grid the nearest border displacement is the least surprising extension.
    outer_at = sample(u_out.data, u_out.grid, pts, fill=None)
    return DisplacementField(u_in.data + outer_at, inner.grid, Frame.PHYSICAL)


def invert(field: DisplacementField, iterations: int = 50, tol: float = 1e-4) -> DisplacementField:
    """Inverse displacement by fixed-point iteration ``v(x) = -u(x + v(x))`` (physical mm).

    Converges where ``u`` is invertible with Lipschitz constant below one; stops when the
    largest update is below ``tol`` (mm).
    """
    u = field.to(Frame.PHYSICAL)
    coords = u.grid.coordinates(Frame.PHYSICAL, dtype=u.data.dtype)
    v = -u.data.clone()
    for _ in range(iterations):
        new = -sample(u.data, u.grid, coords + v, fill=None)
        delta = float((new - v).abs().max())
        v = new
        if delta < tol:
            break
    return DisplacementField(v, u.grid, Frame.PHYSICAL)


# ---------------------------------------------------------------------------- Jacobians
def spatial_gradient(data: Tensor, grid: Grid) -> Tensor:
    """Derivatives of a vector field with respect to world coordinates.

    Args:
        data: ``(ndim, *shape)`` vector field (any units U), components ``(x, y[, z])``.
        grid: Its grid.

    Returns:
        ``(*shape, ndim, ndim)`` tensor ``G[..., c, k] = ∂data_c / ∂world_k`` in U per mm.
        Central differences inside, one-sided at borders; axes of length 1 have zero derivative.
    """
    ndim = grid.ndim
    d_index = []  # derivative along index axis k (x first)
    for k in range(ndim):
        axis = ndim - k  # array axis of index component k, +1 for the channel dim
        if data.shape[axis] < 2:
            d_index.append(torch.zeros_like(data))
        else:
            d_index.append(torch.gradient(data, dim=axis)[0])
    g_index = torch.stack(d_index, dim=-1).movedim(0, -2)  # (*shape, c, k_index)
    a_inv = np.linalg.inv(grid.index_to_world_matrix()[:ndim, :ndim])  # d index / d world
    return g_index @ torch.as_tensor(a_inv, dtype=g_index.dtype)


def jacobian_determinant(field: DisplacementField) -> Tensor:
    """``det(I + ∂u/∂x)`` of ``T`` in physical units: ``(*grid.shape)`` float tensor.

    Spacing and direction aware; a value ≤ 0 marks folding.
    """
    u = field.to(Frame.PHYSICAL)
    n0 = u.grid.shape[0]
    # Slabs of whole rows (with a row of overlap on each side, so central differences inside
    # are exact): the float64 gradient of a 3000² field would take ~0.6 GB at once.
    rows = max(1, JACOBIAN_CHUNK_VOXELS // max(1, u.grid.numel // n0))
    out = torch.empty(u.grid.shape, dtype=torch.float32)
    eye = torch.eye(u.grid.ndim, dtype=torch.float64)
    for a in range(0, n0, rows):
        b = min(n0, a + rows)
        lo, hi = max(0, a - 1), min(n0, b + 1)
        # spatial_gradient takes its axis lengths from the data, so a slab needs no grid of its own.
        g = spatial_gradient(u.data[:, lo:hi].double(), u.grid)
        out[a:b] = torch.linalg.det(eye + g[a - lo : a - lo + (b - a)]).to(torch.float32)
    return out


#: Voxels per slab of :func:`jacobian_determinant`.
JACOBIAN_CHUNK_VOXELS = 1 << 20



# ---------------------------------------------------------------------------- as a transform
class DisplacementTransform(Transform):
    """``T(x) = x + u(x)`` with ``u`` sampled on a grid spanning the domain.

    Args:
        displacement: ``(ndim, *shape)`` or ``(B, ndim, *shape)`` in normalized units of the
            domain (e.g. a network's output), components ``x, y[, z]``.
        domain: The fixed grid; the displacement's grid is ``domain.resized(shape)``.
    """

    def __init__(self, displacement: Tensor, domain: Grid) -> None:
        super().__init__(domain)
        self.displacement = displacement

    @classmethod
    def from_field(cls, field: DisplacementField) -> "DisplacementTransform":
        return cls(field.to(Frame.NORMALIZED).data, field.grid)

    def _channels_last(self) -> Tensor:
        u = self.displacement if self.displacement.dim() == self.ndim + 2 else self.displacement[None]
        return u.movedim(1, -1)

    def normalized_points(self, shape=None) -> Tensor:
        shape = tuple(self.domain.shape if shape is None else shape)
        return self.identity_points(shape) + resize_vectors(self._channels_last(), shape)

    def map_normalized(self, points: Tensor) -> Tensor:
        return points + sample_vectors(self._channels_last(), points)

    def inverse(self) -> "DisplacementTransform":
        """Fixed-point inverse (:func:`invert`) of an unbatched field."""
        grid = self.domain.resized(self.displacement.shape[-self.ndim:])
        return DisplacementTransform.from_field(invert(DisplacementField(self.displacement, grid, Frame.NORMALIZED)))
