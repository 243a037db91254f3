"""Sampling grids and the one routine that converts coordinates between frames.

Conventions (stated once, used everywhere in fmreg):

* **Array order.** Tensors hold image data in array order, exactly as
  ``SimpleITK.GetArrayFromImage`` returns it: ``(Z, Y, X)`` in 3D, ``(Y, X)`` in 2D.
  :attr:`Grid.shape` is in that order.
* **Component order.** Every coordinate or vector (points, displacements, spacing, origin,
  direction columns) lists its components in ITK order ``(x, y[, z])``: the *reverse* of the
  array axes. Component 0 runs along the last array axis (columns). This is also the order
  :func:`torch.nn.functional.grid_sample` expects.
* **Frames** (:class:`Frame`): ``VOXEL`` = continuous voxel index (voxel centre at integer
  index); ``PHYSICAL`` = world millimetres (ITK/LPS world, the frame of NIfTI files read
  through SimpleITK); ``NORMALIZED`` = ``grid_sample`` coordinates with ``align_corners=True``
  (-1 and +1 at the centres of the first and last voxel).

The world position of continuous index ``i`` (components x, y[, z]) is
``origin + direction @ diag(spacing) @ i`` (ITK's definition).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from enum import Enum
from typing import Sequence

import numpy as np
import torch
from torch import Tensor

from fmreg.errors import FmregError


class Frame(str, Enum):
    """The frame a coordinate or a displacement is expressed in (components always x, y[, z])."""

    VOXEL = "voxel"
    PHYSICAL = "physical"
    NORMALIZED = "normalized"


def _as_tuple(values: Sequence[float], n: int, what: str) -> tuple[float, ...]:
    out = tuple(float(v) for v in values)
    if len(out) != n:
        raise FmregError(f"{what} has {len(out)} values, expected {n}")
    return out


@dataclass(frozen=True)
class Grid:
    """A regular sampling grid in physical space: shape, spacing, origin and direction.

    Attributes:
        shape: Number of voxels per array axis, array order ``(Z, Y, X)`` or ``(Y, X)``.
        spacing: Voxel size in mm, components ``(x, y[, z])``.
        origin: World position (mm) of the centre of voxel index 0, components ``(x, y[, z])``.
        direction: Row-major ``ndim × ndim`` direction cosines; column ``k`` is the world
            direction of index axis ``k`` (ITK convention).
    """

    shape: tuple[int, ...]
    spacing: tuple[float, ...] = field(default=())
    origin: tuple[float, ...] = field(default=())
    direction: tuple[float, ...] = field(default=())

    def __post_init__(self) -> None:
        shape = tuple(int(s) for s in self.shape)
        n = len(shape)
        if n not in (2, 3):
            raise FmregError(f"images must be 2D or 3D, got {n} dimensions (shape {shape})")
        if any(s < 1 for s in shape):
            raise FmregError(f"grid shape must be positive, got {shape}")
        spacing = _as_tuple(self.spacing or (1.0,) * n, n, "spacing")
        if any(not math.isfinite(s) or s <= 0 for s in spacing):
            raise FmregError(f"spacing must be positive and finite, got {spacing}")
        origin = _as_tuple(self.origin or (0.0,) * n, n, "origin")
        direction = _as_tuple(self.direction or tuple(np.eye(n).ravel()), n * n, "direction")
        if abs(np.linalg.det(np.asarray(direction).reshape(n, n))) < 1e-6:
            raise FmregError("direction matrix is singular")
        object.__setattr__(self, "shape", shape)
        object.__setattr__(self, "spacing", spacing)
        object.__setattr__(self, "origin", origin)
        object.__setattr__(self, "direction", direction)

    # ------------------------------------------------------------------ basic properties
    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def size(self) -> tuple[int, ...]:
        """Number of voxels per index axis, component order ``(x, y[, z])``."""
        return tuple(reversed(self.shape))

    @property
    def spacing_array(self) -> tuple[float, ...]:
        """Spacing in array-axis order (for ``scipy.ndimage`` ``sampling=`` arguments)."""
        return tuple(reversed(self.spacing))

    @property
    def numel(self) -> int:
        return int(np.prod(self.shape))

    def direction_matrix(self) -> np.ndarray:
        """``(ndim, ndim)`` float64 direction cosines (columns = index axes)."""
        return np.asarray(self.direction, dtype=np.float64).reshape(self.ndim, self.ndim)

    def index_to_world_matrix(self) -> np.ndarray:
        """``(ndim+1, ndim+1)`` homogeneous matrix mapping voxel index (x, y[, z]) to world mm."""
        n = self.ndim
        m = np.eye(n + 1)
        m[:n, :n] = self.direction_matrix() @ np.diag(self.spacing)
        m[:n, n] = self.origin
        return m

    def _normalized_to_index_matrix(self) -> np.ndarray:
        n = self.ndim
        m = np.eye(n + 1)
        for k, s in enumerate(self.size):
            half = (s - 1) / 2.0
            m[k, k] = half if s > 1 else 1.0
            m[k, n] = half
        return m

    def frame_matrix(self, src: Frame | str, dst: Frame | str) -> np.ndarray:
        """Homogeneous ``(ndim+1, ndim+1)`` matrix taking positions in ``src`` to ``dst``."""
        src, dst = Frame(src), Frame(dst)
        to_index = {
            Frame.VOXEL: np.eye(self.ndim + 1),
            Frame.PHYSICAL: np.linalg.inv(self.index_to_world_matrix()),
            Frame.NORMALIZED: self._normalized_to_index_matrix(),
        }
        return np.linalg.inv(to_index[dst]) @ to_index[src]

    # ------------------------------------------------------------------ conversions
    def convert_points(self, points: Tensor, src: Frame | str, dst: Frame | str) -> Tensor:
        """Convert positions ``(..., ndim)`` (components x, y[, z]) from ``src`` to ``dst``."""
        m = torch.as_tensor(self.frame_matrix(src, dst), dtype=points.dtype, device=points.device)
        n = self.ndim
        return points @ m[:n, :n].T + m[:n, n]

    def convert_vectors(self, vectors: Tensor, src: Frame | str, dst: Frame | str) -> Tensor:
        """Convert displacement vectors ``(..., ndim)`` from ``src`` to ``dst`` (no translation)."""
        m = torch.as_tensor(self.frame_matrix(src, dst), dtype=vectors.dtype, device=vectors.device)
        n = self.ndim
        return vectors @ m[:n, :n].T

    def coordinates(self, frame: Frame | str = Frame.PHYSICAL, dtype=torch.float32) -> Tensor:
        """Positions of every voxel centre: ``(ndim, *shape)``, components x, y[, z]."""
        m = torch.as_tensor(self.frame_matrix(Frame.VOXEL, frame), dtype=torch.float64)
        n = self.ndim
        # Component by component from broadcast index vectors: a stacked float64 index array and
        # its matrix product took ~0.4 GB for a 3000² grid, one float64 component takes 72 MB.
        index = [torch.arange(s, dtype=torch.float64).reshape([-1 if a == k else 1 for a in range(n)])
                 for k, s in enumerate(self.shape)]  # array axis k holds voxel component n-1-k
        out = torch.empty((n, *self.shape), dtype=dtype)
        for c in range(n):
            comp = torch.full(self.shape, float(m[c, n]), dtype=torch.float64)
            for k in range(n):
                comp += m[c, n - 1 - k] * index[k]
            out[c] = comp
        return out

    # ------------------------------------------------------------------ derived grids
    def resized(self, shape: Sequence[int]) -> "Grid":
        """The grid covering the same field of view with ``shape`` voxels (array order).

        First and last voxel centres stay where they are (``align_corners=True`` semantics),
        so the spacing changes to ``spacing * (n - 1) / (n_new - 1)``.
        """
        shape = tuple(int(s) for s in shape)
        if len(shape) != self.ndim:
            raise FmregError(f"resized shape {shape} has the wrong number of axes")
        spacing = []
        for s_old, s_new, sp in zip(self.size, reversed(shape), self.spacing):
            spacing.append(sp * (s_old - 1) / (s_new - 1) if s_old > 1 and s_new > 1 else sp)
        return Grid(shape, tuple(spacing), self.origin, self.direction)

    def same_as(self, other: "Grid", atol: float = 1e-4) -> bool:
        """True when both grids put every voxel at the same world position (within ``atol``)."""
        if self.shape != other.shape:
            return False
        return bool(
            np.allclose(self.spacing, other.spacing, atol=atol, rtol=1e-5)
            and np.allclose(self.origin, other.origin, atol=atol * 10)
            and np.allclose(self.direction, other.direction, atol=atol)
        )

    def describe(self) -> str:
        sp = "×".join(f"{s:g}" for s in self.spacing)
        return f"{'×'.join(map(str, self.size))} voxels (x,y[,z]) at {sp} mm"

    def to_dict(self) -> dict:
        return {
            "shape": list(self.shape),
            "spacing": list(self.spacing),
            "origin": list(self.origin),
            "direction": list(self.direction),
        }


def check_same_grid(grid: Grid, reference: Grid, what: str, where: str, hint: str = "") -> None:
    """The one "not on the same grid" check: raise :class:`FmregError` naming both grids.

    Args:
        grid: The grid being checked.
        reference: The grid it must equal (:meth:`Grid.same_as`).
        what: What lies on ``grid`` (e.g. ``"the displacement field"``).
        where: What ``reference`` is, as in ``"{what} is not on {where}"`` (e.g. ``"the fixed grid"``).
        hint: What to do about it, appended after a colon.
    """
    if not grid.same_as(reference):
        tail = f": {hint}" if hint else ""
        raise FmregError(f"{what} ({grid.describe()}) is not on {where} ({reference.describe()}){tail}")


def mask_centroids(masks: Tensor, grid: Grid, frame: Frame | str = Frame.PHYSICAL) -> Tensor:
    """The one centroid routine: weighted centres of masks on ``grid``.

    Args:
        masks: ``(K, *grid.shape)`` bool or soft (non-negative) masks, array order.
        grid: Their grid.
        frame: Frame of the result (``PHYSICAL`` = world mm).

    Returns:
        ``(K, ndim)`` float64 centroids, components ``x, y[, z]``; NaN rows for empty masks.
        The index → world map is affine, so the world centroid is the image of the index
        centroid (also for non-orthonormal directions).
    """
    w = masks.reshape(masks.shape[0], -1).to(torch.float64)
    axes = [torch.arange(n, dtype=torch.float64) for n in grid.shape]
    index = torch.stack(list(reversed(torch.meshgrid(*axes, indexing="ij"))), dim=-1).reshape(-1, grid.ndim)
    total = w.sum(dim=1, keepdim=True)
    centre = (w @ index) / torch.where(total > 0, total, torch.full_like(total, float("nan")))
    return grid.convert_points(centre, Frame.VOXEL, frame)


def through_plane_axis(grid: Grid) -> int:
    """Array axis with the coarsest spacing (the slice axis of a stack), e.g. 0 for ACDC."""
    if grid.ndim != 3:
        raise FmregError("a through-plane axis exists only for 3D grids")
    return int(np.argmax(grid.spacing_array))
