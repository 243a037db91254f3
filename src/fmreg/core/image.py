"""An image is data plus a grid."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from fmreg.errors import FmregError
from fmreg.core.grid import Grid, check_same_grid
from fmreg.core.intensity import percentile_window


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


#: Fewer voxels than this fraction standing out from the background: the image shows nothing.
MIN_SIGNAL_FRACTION = 1e-3
#: A voxel stands out when it differs from the background (the median) by this many noise
#: standard deviations (Gaussian noise exceeds 5σ in under one voxel in a million) ...
NOISE_SIGMAS = 5.0
#: ... and by this fraction of the robust intensity range (:func:`percentile_window`).
MIN_RANGE_FRACTION = 0.1
#: Statistics are estimated from at most this many voxels (a strided sample).
_CONTRAST_SAMPLES = 1_000_000


def _noise_sigma(data: np.ndarray) -> float:
    """Noise standard deviation from neighbour differences along the last axis (robust MAD).

    Edges make few large differences, which the median ignores; noise makes every difference
    ``√2 σ`` wide. An exactly flat background gives 0.
    """
    d = np.diff(data, axis=-1).reshape(-1)
    d = d[:: max(1, d.size // _CONTRAST_SAMPLES)]
    d = d[np.isfinite(d)]
    if d.size == 0:
        return 0.0
    return float(1.4826 * np.median(np.abs(d - np.median(d))) / np.sqrt(2.0))


def check_contrast(image: Image, role: str = "image") -> None:
    """Refuse an image that shows nothing to register: constant, or nothing above its noise.

    A voxel *stands out* when it differs from the background (the median intensity) by more
    than :data:`NOISE_SIGMAS` noise standard deviations and more than
    :data:`MIN_RANGE_FRACTION` of the 1st–99th percentile range (the min–max range when the
    percentiles coincide, so a few bright structures on a dark background keep their
    contrast). An image where fewer than :data:`MIN_SIGNAL_FRACTION` of the voxels stand out
    (pure noise, a single hot voxel) gives a registration driven by nothing.

    Args:
        image: Intensities (label maps are not checked).
        role: How messages name the image, e.g. ``"fixed image"``.

    Raises:
        FmregError: One line naming the image and why it has no contrast.
    """
    if image.is_label:
        return
    data = image.data.detach().cpu().numpy().astype(np.float64, copy=False)
    where = f"{role} {image.name}".strip() if image.name else role
    lo, hi = percentile_window(data, max_samples=_CONTRAST_SAMPLES)
    if hi - lo <= 1e-6 * max(1.0, abs(lo), abs(hi)):
        raise FmregError(f"{where} has no contrast (every voxel is {lo:g}): there is nothing to register")
    flat = data.reshape(-1)[:: max(1, data.size // _CONTRAST_SAMPLES)]
    background = float(np.median(flat))
    floor = max(NOISE_SIGMAS * _noise_sigma(data), MIN_RANGE_FRACTION * (hi - lo))
    fraction = float(np.mean(np.abs(flat - background) > floor))
    if fraction < MIN_SIGNAL_FRACTION:
        raise FmregError(
            f"{where} has no contrast ({100 * fraction:.3g} % of its voxels stand out from the background "
            f"{background:g} and its noise): there is nothing to register"
        )


def check_pair(fixed: Image, moving: Image) -> None:
    """Checks every registration pair must pass, before any work: same dimensionality, finite
    intensities, contrast in both images (:func:`check_contrast`)."""
    if fixed.ndim != moving.ndim:
        raise FmregError(
            f"fixed image is {fixed.ndim}D but moving image is {moving.ndim}D: register images "
            "of the same dimensionality"
        )
    fixed.check_finite()
    moving.check_finite()
    check_contrast(fixed, "fixed image")
    check_contrast(moving, "moving image")


def check_label_grid(labels: Image, image: Image) -> None:
    """A label map must lie on the grid of the image it annotates."""
    check_same_grid(labels.grid, image.grid, f"label map {labels.label()}", f"the grid of {image.label()}")
