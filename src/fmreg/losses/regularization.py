"""Smoothness of a vector field on a grid."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn

from fmreg.losses.base import LossRecord


def diffusion(v: Tensor, spacing_array: Sequence[float]) -> Tensor:
    """Mean squared forward difference per mm of a ``(ndim, *shape)`` field, summed over axes.

    Args:
        v: ``(C, *shape)`` field (e.g. a velocity in mm), array order.
        spacing_array: Grid spacing in mm in array-axis order; axes of one voxel add nothing.

    Returns:
        Scalar in (field units / mm)².
    """
    total = v.new_zeros(())
    for axis, sp in enumerate(spacing_array):
        if v.shape[axis + 1] < 2:
            continue
        d = torch.diff(v, dim=axis + 1) / sp
        total = total + (d * d).mean()
    return total


class Diffusion(nn.Module):
    """``weight · diffusion``; the record's ``reg`` term is the weighted value."""

    def __init__(self, spacing_array: Sequence[float], weight: float = 1.0) -> None:
        super().__init__()
        self.spacing_array, self.weight = tuple(spacing_array), weight

    def forward(self, v: Tensor) -> LossRecord:
        value = self.weight * diffusion(v, self.spacing_array)
        return LossRecord(value, {"reg": value})
