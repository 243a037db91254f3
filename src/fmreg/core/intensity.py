"""Intensity windows and array resizing: the one implementation of each.

Every part of fmreg that brings intensities of any range (CT in HU, MR in arbitrary units) to
a fixed range uses :func:`percentile_window`: percentiles rather than min/max keep a few hot
voxels from compressing the anatomy's contrast.
"""

from __future__ import annotations

from typing import Sequence, TypeVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

Array = TypeVar("Array", Tensor, np.ndarray)


def percentile_window(
    data: Tensor | np.ndarray, low: float = 1.0, high: float = 99.0, max_samples: int | None = None,
    above_minimum: bool = False,
) -> tuple[float, float]:
    """Robust intensity range: the ``low``-th and ``high``-th percentiles of the finite values.

    Args:
        data: Intensities of any shape.
        low, high: Percentiles in ``[0, 100]`` (linear interpolation between ranks).
        max_samples: Estimate from every ``n // max_samples``-th value (flattened order) when
            there are more values than this; None uses all.
        above_minimum: Take the percentiles over the values above the image's minimum only, so
            that a padding frame or a background at the minimum (present in one image of a
            pair and not the other) does not set the window.

    Returns:
        ``(lo, hi)``. When the percentiles coincide (an image that is mostly background) the
        window widens to the finite min and max; ``lo == hi`` only for a constant image, and
        ``(0.0, 0.0)`` when nothing is finite.
    """
    arr = data.detach().cpu().numpy() if isinstance(data, Tensor) else np.asarray(data)
    flat = arr.reshape(-1)
    if max_samples is not None:
        flat = flat[:: max(1, flat.size // max_samples)]
    flat = flat[np.isfinite(flat)]
    if flat.size == 0:
        return 0.0, 0.0
    if above_minimum and (flat > flat.min()).any():
        flat = flat[flat > flat.min()]
    lo, hi = (float(v) for v in np.percentile(flat, (low, high)))
    if hi - lo <= 1e-12 * max(1.0, abs(hi)):
        lo, hi = float(flat.min()), float(flat.max())
    return lo, hi


def normalize(data: Array, low: float = 1.0, high: float = 99.0, max_samples: int | None = None,
              above_minimum: bool = False) -> Array:
    """Intensities mapped to ``[0, 1]`` by :func:`percentile_window`, clipped outside it.

    Returns:
        float32 array or tensor of ``data``'s shape and kind; all zeros for a constant image.
    """
    lo, hi = percentile_window(data, low, high, max_samples, above_minimum)
    if isinstance(data, Tensor):
        x = data.to(torch.float32)
        if hi - lo <= 1e-12 * max(1.0, abs(hi)):
            return torch.zeros_like(x)
        return ((x - lo) / (hi - lo)).clamp(0.0, 1.0)
    x = np.asarray(data, dtype=np.float32)
    if hi - lo <= 1e-12 * max(1.0, abs(hi)):
        return np.zeros_like(x)
    return np.clip((x - lo) / (hi - lo), 0.0, 1.0).astype(np.float32)


def resize(data: Tensor, shape: Sequence[int], mode: str = "linear") -> Tensor:
    """Resize ``(C, *old_shape)`` channels to ``(C, *shape)`` (2D or 3D spatial axes).

    Args:
        data: ``(C, *old_shape)`` float tensor, array order.
        shape: New spatial shape, array order.
        mode: ``"linear"``: first and last voxel centres stay in place (``align_corners=True``,
            the convention of :meth:`fmreg.core.grid.Grid.resized`); ``"area"``: averages of
            the covered voxels (anti-aliased shrinking).
    """
    shape = tuple(int(s) for s in shape)
    if tuple(data.shape[1:]) == shape:
        return data
    if mode == "area":
        return F.interpolate(data[None], size=shape, mode="area")[0]
    torch_mode = "trilinear" if len(shape) == 3 else "bilinear"
    return F.interpolate(data[None], size=shape, mode=torch_mode, align_corners=True)[0]


def match_histogram(moving: Tensor, fixed: Tensor) -> Tensor:
    """``moving``'s intensities remapped so that their quantiles equal ``fixed``'s (ranks kept)."""
    from skimage.exposure import match_histograms

    return torch.from_numpy(match_histograms(moving.numpy(), fixed.numpy()).astype("float32"))


#: uniGradICON's CT window, Hounsfield units.
CT_WINDOW = (-1000.0, 1000.0)


def looks_like_ct(data: Tensor) -> bool:
    """Intensities in Hounsfield units: air at about -1000 (no MR or photograph goes below -500)."""
    return float(data.min()) < -500.0


def foundation_normalize(data: Tensor, modality: str = "auto") -> Tensor:
    """uniGradICON's intensity preprocessing: CT clamped to [-1000, 1000] HU, anything else from
    its minimum to its 99th percentile, both scaled to [0, 1].

    Args:
        data: Intensities of any shape.
        modality: ``"ct"``, ``"mr"`` (any non-CT image) or ``"auto"`` (:func:`looks_like_ct`).

    Returns:
        float32 tensor in [0, 1] of ``data``'s shape (zeros for a constant image).
    """
    if modality == "auto":
        modality = "ct" if looks_like_ct(data) else "mr"
    if modality == "ct":
        lo, hi = CT_WINDOW
    else:
        lo, hi = percentile_window(data, 0.0, 99.0, max_samples=1_000_000)
    if hi <= lo:
        return torch.zeros_like(data, dtype=torch.float32)
    return ((data.to(torch.float32) - lo) / (hi - lo)).clamp(0.0, 1.0)
