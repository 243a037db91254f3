"""Displacement fields: the transform convention, warping, composition, inversion, Jacobians.

**The convention (the one place it is stated).** A registration result is a transform ``T``
that maps *fixed-image* physical points to *moving-image* physical points,
``T(x) = x + u(x)``, with ``u`` sampled on the fixed grid. Warping pulls back: the warped
image on the fixed grid is ``moving(T(x))``. This is ITK's ``DisplacementFieldTransform``
as used by ``sitk.Resample(moving, fixed, transform)``, so ``ddf.nii.gz`` written by
:func:`fmreg.io.images.write_field` loads unchanged in SimpleITK / ITK / 3D Slicer.

A :class:`DisplacementField` carries its frame (:class:`fmreg.core.grid.Frame`); its components
are always in ``(x, y[, z])`` order (see :mod:`fmreg.core.grid`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from fmreg.errors import FmregError
from fmreg.core.grid import Frame, Grid
from fmreg.core.image import Image


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

    def mapped_points(self, frame: Frame | str = Frame.PHYSICAL) -> Tensor:
        """``T(x)`` for every voxel ``x`` of the grid: ``(ndim, *shape)``, in ``frame`` of the grid."""
        frame = Frame(frame)
        return self.grid.coordinates(frame, dtype=self.data.dtype) + self.to(frame).data


# ---------------------------------------------------------------------------- sampling
def sample(
    data: Tensor,
    grid: Grid,
    points: Tensor,
    mode: str = "linear",
    fill: float | None = 0.0,
) -> Tensor:
    """Sample ``data`` (on ``grid``) at physical ``points``.

    Args:
        data: ``(*grid.shape)`` or ``(C, *grid.shape)`` tensor, array order.
        grid: Grid of ``data``.
        points: ``(ndim, *out_shape)`` physical positions in mm, components ``(x, y[, z])``.
        mode: ``"linear"`` or ``"nearest"``.
        fill: Value for points more than half a voxel outside the grid (ITK's rule);
            ``None`` extends the border value everywhere.

    Returns:
        ``(*out_shape)`` or ``(C, *out_shape)`` samples, float.
    """
    ndim = grid.ndim
    squeeze = data.dim() == ndim
    x = (data[None] if squeeze else data)[None].to(torch.float32)
    pts = points.movedim(0, -1).to(torch.float64)
    norm = grid.convert_points(pts, Frame.PHYSICAL, Frame.NORMALIZED).to(torch.float32)
    if mode == "nearest":
        # Round in index space so ties go the way ITK's NearestNeighborInterpolator goes.
        idx = grid.convert_points(pts, Frame.PHYSICAL, Frame.VOXEL)
        idx = torch.floor(idx + 0.5)
        norm = grid.convert_points(idx, Frame.VOXEL, Frame.NORMALIZED).to(torch.float32)
    out_shape = norm.shape[:-1]
    # 2D grids are sampled natively; the singleton batch dim is the only addition.
    gs = norm.reshape(1, *out_shape, ndim) if len(out_shape) == ndim else norm.reshape(1, -1, *([1] * (ndim - 1)), ndim)
    torch_mode = "bilinear" if mode == "linear" else "nearest"
    out = F.grid_sample(x, gs, mode=torch_mode, padding_mode="border", align_corners=True)
    out = out.reshape(x.shape[1], *out_shape)
    if fill is not None:
        idx = grid.convert_points(pts, Frame.PHYSICAL, Frame.VOXEL)
        size = torch.tensor(grid.size, dtype=idx.dtype)
        inside = ((idx >= -0.5) & (idx <= size - 0.5)).all(dim=-1)
        out = torch.where(inside, out, torch.as_tensor(fill, dtype=out.dtype))
    return out[0] if squeeze else out


def warp(moving: Image, field: DisplacementField, mode: str = "linear", fill: float = 0.0) -> Image:
    """Warp ``moving`` onto the field's (fixed) grid: ``warped(x) = moving(x + u(x))``.

    Args:
        moving: Image on its own grid (may differ from the field's grid).
        field: Displacement on the fixed grid, any frame.
        mode: ``"linear"`` for intensities, ``"nearest"`` for label maps.
        fill: Value outside the moving image's extent.

    Returns:
        Float image on ``field.grid`` (label maps keep their integer dtype with ``nearest``).
    """
    if moving.ndim != field.grid.ndim:
        raise FmregError(f"cannot warp a {moving.ndim}D image with a {field.grid.ndim}D field")
    pts = field.mapped_points(Frame.PHYSICAL)
    out = sample(moving.data, moving.grid, pts, mode=mode, fill=fill)
    if moving.is_label and mode == "nearest":
        out = torch.round(out).to(moving.data.dtype)
    return Image(out, field.grid, moving.name)


def warp_labels(moving_labels: Image, field: DisplacementField, smooth: bool = False) -> Image:
    """Warp a label map without inventing values.

    Args:
        moving_labels: Integer label map.
        field: Displacement on the fixed grid.
        smooth: ``False``: nearest neighbour. ``True``: each label's indicator is warped with
            linear interpolation and each voxel takes the label with the largest weight, which
            gives smoother boundaries than nearest neighbour on anisotropic grids.
    """
    if not smooth:
        return warp(moving_labels, field, mode="nearest")
    # np.unique: torch.unique is ~500× slower on CPU for label volumes.
    values = torch.from_numpy(np.unique(moving_labels.data.numpy()))
    pts = field.mapped_points(Frame.PHYSICAL)
    onehot = torch.stack([(moving_labels.data == v).float() for v in values])
    weights = sample(onehot, moving_labels.grid, pts, mode="linear", fill=None)
    idx = weights.argmax(dim=0)
    return Image(values[idx].to(moving_labels.data.dtype), field.grid, moving_labels.name)


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
    g = spatial_gradient(u.data.double(), u.grid)
    eye = torch.eye(u.grid.ndim, dtype=g.dtype)
    return torch.linalg.det(eye + g).to(torch.float32)
