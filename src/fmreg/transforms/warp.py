"""Warping images with a transform (pull-back onto the fixed grid)."""

from __future__ import annotations

import numpy as np
import torch

from fmreg.core.grid import Frame
from fmreg.core.image import Image
from fmreg.core.sampling import sample
from fmreg.errors import FmregError
from fmreg.transforms.base import Transform
from fmreg.transforms.displacement import DisplacementField


def _mapped_points(moving: Image, transform: Transform | DisplacementField):
    """``(ndim, *fixed.shape)`` physical points ``T(x)`` and the fixed grid they lie on."""
    if isinstance(transform, DisplacementField):
        grid, pts = transform.grid, transform.mapped_points(Frame.PHYSICAL)
    else:
        grid, pts = transform.domain, transform.points()
    if moving.ndim != grid.ndim:
        raise FmregError(f"cannot warp a {moving.ndim}D image with a {grid.ndim}D transform")
    return grid, pts


def warp(moving: Image, transform: Transform | DisplacementField, mode: str | None = None,
         fill: float = 0.0) -> Image:
    """Warp ``moving`` onto the fixed grid: ``warped(x) = moving(T(x))``.

    Args:
        moving: Image on its own grid (may differ from the fixed grid).
        transform: A transform (its domain is the fixed grid) or a displacement on the fixed
            grid, any frame.
        mode: ``"linear"`` or ``"nearest"``; None chooses by the image: nearest neighbour for
            a label map (integer values kept), linear for intensities.
        fill: Value outside the moving image's extent.

    Returns:
        Image on the fixed grid (float, or the label map's integer dtype with ``nearest``).
    """
    mode = mode or ("nearest" if moving.is_label else "linear")
    grid, pts = _mapped_points(moving, transform)
    out = sample(moving.data, moving.grid, pts, mode=mode, fill=fill)
    if moving.is_label and mode == "nearest":
        out = torch.round(out).to(moving.data.dtype)
    # A label map resampled linearly is no longer a label map.
    kind = type(moving) if mode == "nearest" or not moving.is_label else Image
    return kind(out, grid, moving.name)


def warp_labels(moving_labels: Image, transform: Transform | DisplacementField, smooth: bool = False) -> Image:
    """Warp a label map without inventing values.

    Args:
        moving_labels: Integer label map.
        transform: As in :func:`warp`.
        smooth: ``False``: nearest neighbour. ``True``: each label's indicator is warped with
            linear interpolation and each voxel takes the label with the largest weight, which
            gives smoother boundaries than nearest neighbour on anisotropic grids.
    """
    if not smooth:
        return warp(moving_labels, transform, mode="nearest")
    grid, pts = _mapped_points(moving_labels, transform)
    # np.unique: torch.unique is ~500× slower on CPU for label volumes.
    values = torch.from_numpy(np.unique(moving_labels.data.numpy()))
    onehot = torch.stack([(moving_labels.data == v).float() for v in values])
    weights = sample(onehot, moving_labels.grid, pts, mode="linear", fill=None)
    idx = weights.argmax(dim=0)
    return type(moving_labels)(values[idx].to(moving_labels.data.dtype), grid, moving_labels.name)
