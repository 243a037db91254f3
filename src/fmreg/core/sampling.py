"""Sampling data at points: the one place ``grid_sample`` is called.

Two entry points, one convention (see :mod:`fmreg.core.grid`):

* :func:`sample_normalized` takes batch-first data and points in a grid's ``NORMALIZED``
  frame (``grid_sample`` coordinates, components ``x, y[, z]``): what optimisers and
  networks use on their working grids.
* :func:`sample` takes data on a :class:`~fmreg.core.grid.Grid` and *physical* points (mm):
  what IO-facing code uses to resample between two images' grids.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from fmreg.core.grid import Frame, Grid


def identity_points(shape: Sequence[int], dtype: torch.dtype = torch.float32) -> Tensor:
    """Normalized positions of every voxel centre of a grid of ``shape``.

    Args:
        shape: Grid shape in array order, 2 or 3 axes.

    Returns:
        ``(1, *shape, ndim)`` tensor, components ``x, y[, z]``; -1 and +1 at the first and last
        voxel centres (0 along an axis of one voxel).
    """
    axes = [torch.linspace(-1, 1, n, dtype=dtype) if n > 1 else torch.zeros(1, dtype=dtype) for n in shape]
    mesh = torch.meshgrid(*axes, indexing="ij")
    return torch.stack(list(reversed(mesh)), dim=-1)[None]


def sample_normalized(data: Tensor, points: Tensor, mode: str = "linear", padding: str = "zeros") -> Tensor:
    """Sample batch-first data at normalized points.

    Args:
        data: ``(B, C, *shape)`` tensor, array order.
        points: ``(B, *out_shape, ndim)`` normalized positions in the frame of ``data``'s grid;
            a batch of one on either side is broadcast to the other's batch.
        mode: ``"linear"`` or ``"nearest"``.
        padding: ``"zeros"`` (0 outside the grid) or ``"border"`` (nearest border value).

    Returns:
        ``(B, C, *out_shape)`` samples.
    """
    if data.shape[0] != points.shape[0]:
        if points.shape[0] == 1:
            points = points.expand(data.shape[0], *points.shape[1:])
        elif data.shape[0] == 1:
            data = data.expand(points.shape[0], *data.shape[1:])
    torch_mode = "bilinear" if mode == "linear" else "nearest"
    # grid_sample reads out of bounds (and crashes the process) at NaN points: send them outside
    # the grid, where the NaN that produced them still shows in every loss computed from them.
    points = torch.nan_to_num(points, nan=-2.0, posinf=2.0, neginf=-2.0)
    return F.grid_sample(data, points, mode=torch_mode, padding_mode=padding, align_corners=True)


def sample_vectors(field: Tensor, points: Tensor) -> Tensor:
    """Sample a channels-last vector field at normalized points (border values outside).

    Args:
        field: ``(B, *shape, ndim)`` vectors (e.g. a normalized displacement).
        points: ``(B, *out_shape, ndim)`` normalized positions.

    Returns:
        ``(B, *out_shape, ndim)`` vectors.
    """
    return sample_normalized(field.movedim(-1, 1), points, padding="border").movedim(1, -1)


#: Output points sampled together by :func:`sample`.
SAMPLE_CHUNK_POINTS = 1 << 20


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
    if points.dim() > 1 and points.shape[1] > 1 and points[0].numel() > SAMPLE_CHUNK_POINTS:
        # In slabs along the first output axis: the float64 points and their index copies of a
        # 3000² image would take ~0.5 GB at once.
        rows = points.shape[1]
        step = max(1, SAMPLE_CHUNK_POINTS // (points[0].numel() // rows))
        parts = [sample(data, grid, points[:, i : i + step], mode, fill) for i in range(0, rows, step)]
        return torch.cat(parts, dim=0 if squeeze else 1)
    x = (data[None] if squeeze else data)[None].to(torch.float32)
    pts = points.movedim(0, -1).to(torch.float64)
    if mode == "nearest":
        # Round in index space so ties go the way ITK's NearestNeighborInterpolator goes.
        idx = torch.floor(grid.convert_points(pts, Frame.PHYSICAL, Frame.VOXEL) + 0.5)
        norm = grid.convert_points(idx, Frame.VOXEL, Frame.NORMALIZED).to(torch.float32)
    else:
        norm = grid.convert_points(pts, Frame.PHYSICAL, Frame.NORMALIZED).to(torch.float32)
    out_shape = norm.shape[:-1]
    # 2D grids are sampled natively; the singleton batch dim is the only addition.
    gs = norm.reshape(1, *out_shape, ndim) if len(out_shape) == ndim else norm.reshape(1, -1, *([1] * (ndim - 1)), ndim)
    out = sample_normalized(x, gs, mode=mode, padding="border").reshape(x.shape[1], *out_shape)
    if fill is not None:
        idx = grid.convert_points(pts, Frame.PHYSICAL, Frame.VOXEL)
        size = torch.tensor(grid.size, dtype=idx.dtype)
        inside = ((idx >= -0.5) & (idx <= size - 0.5)).all(dim=-1)
        out = torch.where(inside, out, torch.as_tensor(fill, dtype=out.dtype))
    return out[0] if squeeze else out
