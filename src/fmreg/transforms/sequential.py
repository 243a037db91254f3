"""Composition of transforms."""

from __future__ import annotations

from typing import Sequence

from torch import Tensor, nn

from fmreg.transforms.base import Transform


class SequentialTransform(Transform):
    """``T = T_n ∘ … ∘ T_1``: points go through ``transforms[0]`` first.

    The SAMReg fit's ``T = A ∘ exp(v)`` is ``SequentialTransform(velocity, affine)``.

    Args:
        transforms: Transforms on the same domain grid, in the order they are applied.
    """

    def __init__(self, *transforms: Transform) -> None:
        if not transforms:
            raise ValueError("SequentialTransform needs at least one transform")
        super().__init__(transforms[0].domain)
        self.transforms = nn.ModuleList(transforms)

    def normalized_points(self, shape: Sequence[int] | None = None) -> Tensor:
        pts = self.transforms[0].normalized_points(shape)
        for t in list(self.transforms)[1:]:
            pts = t.map_normalized(pts)
        return pts

    def map_normalized(self, points: Tensor) -> Tensor:
        for t in self.transforms:
            points = t.map_normalized(points)
        return points

    def inverse(self) -> "SequentialTransform":
        return SequentialTransform(*[t.inverse() for t in reversed(list(self.transforms))])
