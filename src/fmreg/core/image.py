"""An image is data plus a grid."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from fmreg.errors import FmregError
from fmreg.core.grid import Grid, check_same_grid


@dataclass
class Image:
    """Image data on a physical grid.

    Attributes:
        data: ``(*grid.shape)`` tensor in array order (``(Z, Y, X)`` or ``(Y, X)``); float32
            intensities, or an integer tensor for a label map.
        grid: Where each voxel is in physical space.
        name: Where the image came from (for messages), may be empty.
    """

    data: Tensor
    grid: Grid
    name: str = ""

    def __post_init__(self) -> None:
        if tuple(self.data.shape) != tuple(self.grid.shape):
            raise FmregError(
                f"{self.label()}: data shape {tuple(self.data.shape)} differs from grid shape "
                f"{self.grid.shape}"
            )

    @property
    def ndim(self) -> int:
        return self.grid.ndim

    @property
    def is_label(self) -> bool:
        """True for integer data (a label map), False for intensities."""
        return not torch.is_floating_point(self.data)

    def label(self) -> str:
        return self.name or "image"

    def check_finite(self) -> "Image":
        """Raise :class:`FmregError` when intensities contain NaN or Inf."""
        if torch.is_floating_point(self.data) and not bool(torch.isfinite(self.data).all()):
            bad = int((~torch.isfinite(self.data)).sum())
            raise FmregError(f"{self.label()} contains {bad} NaN/Inf intensities")
        return self

    def with_data(self, data: Tensor, name: str | None = None) -> "Image":
        """The same kind of image on the same grid with other data."""
        return type(self)(data, self.grid, self.name if name is None else name)


class LabelMap(Image):
    """An integer label map (TorchIO's ``LabelMap``): warped by nearest neighbour or label by
    label (:func:`fmreg.transforms.warp.warp_labels`), never interpolated into new values."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if torch.is_floating_point(self.data):
            raise FmregError(f"{self.label()}: a label map needs integer data, got {self.data.dtype}")


def check_pair(fixed: Image, moving: Image) -> None:
    """Checks every registration pair must pass: same dimensionality, finite intensities."""
    if fixed.ndim != moving.ndim:
        raise FmregError(
            f"fixed image is {fixed.ndim}D but moving image is {moving.ndim}D: register images "
            "of the same dimensionality"
        )
    fixed.check_finite()
    moving.check_finite()


def check_label_grid(labels: Image, image: Image) -> None:
    """A label map must lie on the grid of the image it annotates."""
    check_same_grid(labels.grid, image.grid, f"label map {labels.label()}", f"the grid of {image.label()}")
