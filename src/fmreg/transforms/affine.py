"""Affine transforms ``T(p) = A p + b`` in the domain grid's normalized frame."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from fmreg.core.grid import Frame, Grid
from fmreg.transforms.base import Transform


class AffineTransform(Transform):
    """``T(p) = A p + b``, with ``p`` in the domain's normalized frame.

    Args:
        matrix: ``(ndim, ndim)`` or batched ``(B, ndim, ndim)`` matrix ``A``.
        offset: ``(ndim,)`` or ``(B, ndim)`` translation ``b`` (normalized units).
        domain: The fixed grid.
    """

    def __init__(self, matrix: Tensor, offset: Tensor, domain: Grid) -> None:
        super().__init__(domain)
        self.matrix = matrix
        self.offset = offset

    @classmethod
    def identity(cls, domain: Grid) -> "AffineTransform":
        return cls(torch.eye(domain.ndim), torch.zeros(domain.ndim), domain)

    @classmethod
    def from_physical(cls, homogeneous: np.ndarray, domain: Grid) -> "AffineTransform":
        """From a ``(ndim+1, ndim+1)`` homogeneous map of fixed physical mm to moving physical mm.

        The moving image is resampled onto the domain's extent before it is warped, so the map
        becomes one from the domain's normalized frame to itself.
        """
        n = domain.ndim
        to_norm = domain.frame_matrix(Frame.PHYSICAL, Frame.NORMALIZED)
        h = torch.as_tensor(to_norm @ homogeneous @ np.linalg.inv(to_norm), dtype=torch.float32)
        return cls(h[:n, :n].contiguous(), h[:n, n].contiguous(), domain)

    def to_physical(self) -> np.ndarray:
        """The ``(ndim+1, ndim+1)`` float64 map of fixed physical mm to moving physical mm
        (unbatched transforms; the inverse of :meth:`from_physical`)."""
        n = self.ndim
        h = np.eye(n + 1)
        h[:n, :n] = self.matrix.detach().double().numpy()
        h[:n, n] = self.offset.detach().double().numpy()
        to_norm = self.domain.frame_matrix(Frame.PHYSICAL, Frame.NORMALIZED)
        return np.linalg.inv(to_norm) @ h @ to_norm

    def map_normalized(self, points: Tensor) -> Tensor:
        if self.matrix.dim() == 2:
            return points @ self.matrix.T + self.offset
        b, n = points.shape[0], self.ndim
        flat = points.reshape(b, -1, n) @ self.matrix.transpose(1, 2) + self.offset[:, None]
        return flat.reshape(points.shape)

    def inverse(self) -> "AffineTransform":
        inv = torch.linalg.inv(self.matrix)
        off = -(inv @ self.offset[..., None])[..., 0]
        return AffineTransform(inv, off, self.domain)

    def is_orientation_preserving(self) -> bool:
        """False when ``det(A) <= 0`` (a reflection or a collapse)."""
        return bool((torch.linalg.det(self.matrix) > 0).all())
