"""Input checks and resampling shared by the classical segmenter and encoder.

All arrays use the order (H, W) = (rows, columns); sizes are in pixels.
"""

from __future__ import annotations

import inspect
from typing import Callable

import numpy as np
import torch
from torch import Tensor

from fmreg.core.intensity import resize
from fmreg.errors import FmregError


def as_slice(image: Tensor | np.ndarray) -> np.ndarray:
    """One slice as a checked float32 array (no copy when it already is one).

    Args:
        image: ``(H, W)`` slice, any intensity range, tensor or array.

    Returns:
        ``(H, W)`` float32 array.

    Raises:
        FmregError: not 2D, smaller than 8x8 (too small for the proposal scales), or holding
            NaN/Inf.
    """
    arr = image.detach().cpu().numpy() if isinstance(image, Tensor) else np.asarray(image)
    if arr.ndim != 2:
        raise FmregError(f"expected a 2D (H, W) slice, got shape {tuple(arr.shape)}")
    if min(arr.shape) < 8:
        raise FmregError(f"slice {tuple(arr.shape)} is too small to segment: need 8x8 or more")
    arr = arr.astype(np.float32, copy=False)
    if not np.isfinite(arr).all():
        raise FmregError("slice contains NaN/Inf intensities")
    return arr


def resize_area(img: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Area-average resize of an ``(H, W)`` array to ``shape`` (anti-aliased when shrinking)."""
    if img.shape == shape:
        return img
    data = torch.from_numpy(np.ascontiguousarray(img, dtype=np.float32))[None]
    return resize(data, shape, mode="area")[0].numpy()


def check_options(func: Callable, options: dict, what: str) -> None:
    """Raise a user error naming ``func``'s keyword-only options when ``options`` has others."""
    allowed = [
        n for n, p in inspect.signature(func).parameters.items() if p.kind is p.KEYWORD_ONLY
    ]
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise FmregError(f"unknown {what} option(s) {unknown}: use {allowed}")
