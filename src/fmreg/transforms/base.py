"""What every spatial transform is: a map from fixed-image points to moving-image points.

A :class:`Transform` ``T`` maps *fixed* physical points to *moving* physical points (the
convention of :mod:`fmreg.transforms.displacement`); warping samples the moving image at
``T(x)``. Each transform is defined over a **domain** grid (the fixed grid) and works in that
grid's ``NORMALIZED`` frame (``grid_sample`` coordinates, components ``x, y[, z]``): the frame
is the same on every resampling of the domain that keeps its extent (pyramid levels, control
grids), so an optimiser or a network can evaluate it at any resolution.

Parameters are plain tensors held by reference: a leaf tensor an optimiser updates in place,
or a network's output. Batch-first parameters (``(B, ...)``) give batched points.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn

from fmreg.core.grid import Frame, Grid
from fmreg.core.sampling import identity_points


class Transform(nn.Module):
    """Base class: subclasses implement :meth:`map_normalized` (and may speed up
    :meth:`normalized_points` and provide :meth:`inverse`).

    Args:
        domain: The grid the transform is defined on (the fixed image's grid).
    """

    def __init__(self, domain: Grid) -> None:
        super().__init__()
        self.domain = domain
        self._identities: dict[tuple[int, ...], Tensor] = {}

    @property
    def ndim(self) -> int:
        return self.domain.ndim

    def map_normalized(self, points: Tensor) -> Tensor:
        """``T(p)`` for points ``(B, *shape, ndim)`` in the domain's normalized frame, same frame out."""
        raise NotImplementedError

    def forward(self, points: Tensor) -> Tensor:
        return self.map_normalized(points)

    def identity_points(self, shape: Sequence[int] | None = None) -> Tensor:
        """``identity_points(shape)`` (default: the domain's), kept for the transform's lifetime:
        an optimiser evaluates the same grid at every step."""
        shape = tuple(self.domain.shape if shape is None else shape)
        if shape not in self._identities:
            self._identities[shape] = identity_points(shape)
        return self._identities[shape]

    def normalized_points(self, shape: Sequence[int] | None = None) -> Tensor:
        """``T(x)`` for every voxel ``x`` of ``domain.resized(shape)`` (default: the domain).

        Returns:
            ``(B, *shape, ndim)`` positions in the domain's normalized frame.
        """
        return self.map_normalized(self.identity_points(shape))

    def points(self, grid: Grid | None = None, frame: Frame | str = Frame.PHYSICAL) -> Tensor:
        """``T(x)`` for every voxel ``x`` of ``grid`` (default: the domain), unbatched.

        Args:
            grid: Any grid in the same world; a resampling of the domain that keeps its
                extent takes the fast path of :meth:`normalized_points`.
            frame: Frame of the returned positions (of the domain grid; ``PHYSICAL`` = mm).

        Returns:
            ``(ndim, *grid.shape)`` positions, components ``x, y[, z]``.
        """
        grid = self.domain if grid is None else grid
        if grid.same_as(self.domain.resized(grid.shape)):
            norm = self.normalized_points(grid.shape)
        else:
            x = grid.coordinates(Frame.PHYSICAL, dtype=torch.float64).movedim(0, -1)
            norm = self.map_normalized(self.domain.convert_points(x, Frame.PHYSICAL, Frame.NORMALIZED).float()[None])
        if norm.shape[0] != 1:
            raise ValueError("points() is defined for unbatched transforms; use normalized_points()")
        out = self.domain.convert_points(norm[0].double(), Frame.NORMALIZED, frame)
        return out.movedim(-1, 0).float()

    def field(self, grid: Grid | None = None):
        """The displacement ``u = T(x) - x`` on ``grid`` (default: the domain), physical mm.

        This is the one routine that turns any transform into the
        :class:`~fmreg.transforms.displacement.DisplacementField` written as ``ddf.nii.gz``.
        """
        from fmreg.transforms.displacement import DisplacementField

        grid = self.domain if grid is None else grid
        if grid.same_as(self.domain.resized(grid.shape)):
            # Subtracting in the normalized frame keeps the identity exact (no mm round trip).
            u = self.normalized_points(grid.shape) - self.identity_points(grid.shape)
            if u.shape[0] != 1:
                raise ValueError("field() is defined for unbatched transforms")
            return DisplacementField(u[0].movedim(-1, 0).contiguous(), grid, Frame.NORMALIZED).to(Frame.PHYSICAL)
        u = self.points(grid) - grid.coordinates(Frame.PHYSICAL)
        return DisplacementField(u, grid, Frame.PHYSICAL)

    def inverse(self) -> "Transform":
        """The inverse transform, where it is defined."""
        raise NotImplementedError(f"{type(self).__name__} has no inverse")
