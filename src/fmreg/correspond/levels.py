"""ROI pairs redrawn as one kind of iso-intensity region in both images.

Two segmentations cut one structure differently: a graph merge or a histogram threshold chosen
on one image's whole field of view puts the boundary elsewhere in the other image. The dense
fit (paper 002, Eq. 10) then bends the field to follow the cuts, not the structure: on
known-similarity pairs with the image term off the found masks of a pair differ by more than
the 3 mm local motion, while masks that differ only by the true motion let the fit recover it
to about 0.5 px (``docs/benchmarks.md``).

So each pair's two masks are redrawn by one rule that depends only on the structure: in its
own image, a region is the connected set brighter (or darker) than the level halfway between
its mean and the mean of a ring around it, re-levelled a few times (iso-data). The ring is a
window around the fixed ROI and, in the moving image, that same window carried over by the
global similarity, so neither image's window comes from its own segmentation. A pair is
dropped when its region leaks out of the window (its outline runs along the window's rim,
where the two windows need not correspond) or when the two regions disagree under the global
similarity (a level set that changed shape between the images).

Off by default (``redraw_masks``): with the image term off it brings known-similarity pairs
(pure warps of one image) within 2 px where the found masks do not, but on the shared pairs
(two acquisitions, often two subjects) the level sets do not redraw alike, the pairs that carry
the real local motion are dropped, and ROI-only Dice falls; with the image term on it changes
nothing measurable (``docs/benchmarks.md``).

Coordinates: in-plane mm from each slice's first pixel, ``(x, y)`` = (column, row), as in
:mod:`fmreg.correspond.consensus`.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Sequence

import numpy as np
import torch
from scipy import ndimage as ndi
from torch import Tensor

from fmreg.core.intensity import normalize
from fmreg.correspond.outlines import outline_mask

__all__ = ["MIN_CONTRAST", "MIN_IOU", "MAX_RIM", "WINDOW", "level_region", "redraw_pairs"]

#: Window around a ROI: this fraction of its equivalent radius (at least three pixels).
WINDOW = 0.3
#: A region whose outline lies on the window's rim for more than this fraction is dropped.
MAX_RIM = 0.35
#: The two redrawn regions must overlap by this IoU under the global similarity.
MIN_IOU = 0.6
#: Mean inside and ring differing by less than this (normalised intensity): no level to draw.
MIN_CONTRAST = 0.02
#: Iso-data rounds (the level, the region, the level again).
ROUNDS = 3

_FOUR = ndi.generate_binary_structure(2, 1)


def level_region(image: np.ndarray, seed: np.ndarray, window: np.ndarray) -> np.ndarray | None:
    """The iso-intensity region of ``image`` that ``seed`` marks, within ``window``.

    Args:
        image: ``(H, W)`` float intensities (smoothed, normalised).
        seed: ``(H, W)`` bool, the segmentation's mask; picks the component and the first level.
        window: ``(H, W)`` bool, where the region and its ring may lie.

    Returns:
        ``(H, W)`` bool region, or None: no contrast with the ring, or the region leaks out of
        the window.
    """
    region = seed & window
    for _ in range(ROUNDS):
        ring = window & ~region
        if region.sum() < 4 or ring.sum() < 4:
            return None
        inside, outside = float(image[region].mean()), float(image[ring].mean())
        if abs(inside - outside) < MIN_CONTRAST:
            return None
        above = np.sign(inside - outside) * (image - 0.5 * (inside + outside)) > 0
        labels, n = ndi.label(above & window, _FOUR)
        overlap = np.bincount(labels[seed & window], minlength=n + 1)
        overlap[0] = 0
        if n == 0 or overlap.max() == 0:
            return None
        region = labels == overlap.argmax()
    outline = outline_mask(region)
    return None if (outline & outline_mask(window)).sum() > MAX_RIM * outline.sum() else region


def _carry(mask: np.ndarray, spacing_from: Sequence[float], spacing_to: Sequence[float],
           shape_to: Sequence[int], matrix: np.ndarray) -> np.ndarray:
    """``mask`` (on the 'from' slice) seen on the 'to' slice, where ``matrix`` maps 'to' mm to
    'from' mm (``(3, 3)``, ``(x, y)`` order); nearest neighbour."""
    rows, cols = np.meshgrid(np.arange(shape_to[0]), np.arange(shape_to[1]), indexing="ij")
    xy = np.stack([cols * spacing_to[1], rows * spacing_to[0], np.ones(rows.shape)])
    x, y, _ = np.einsum("ij,jhw->ihw", matrix, xy)
    coords = np.stack([y / spacing_from[0], x / spacing_from[1]])
    return ndi.map_coordinates(mask.astype(np.float32), coords, order=0, mode="constant", cval=0.0) > 0.5


def _smoothed(image: Tensor, spacing: Sequence[float], sigma_mm: float) -> np.ndarray:
    data = normalize(image.float(), above_minimum=True).numpy().astype(np.float64)
    return ndi.gaussian_filter(data, [sigma_mm / s for s in spacing])


def _redraw_one(fixed_img: np.ndarray, moving_img: np.ndarray, fixed_mask: np.ndarray, moving_mask: np.ndarray,
                spacing_f: Sequence[float], spacing_m: Sequence[float], matrix: np.ndarray):
    area_mm2 = float(fixed_mask.sum()) * spacing_f[0] * spacing_f[1]
    radius = max(3.0 * max(spacing_f), WINDOW * np.sqrt(area_mm2 / np.pi))
    window_f = ndi.distance_transform_edt(~fixed_mask, sampling=spacing_f) <= radius
    window_m = _carry(window_f, spacing_f, spacing_m, moving_mask.shape, np.linalg.inv(matrix))
    f = level_region(fixed_img, fixed_mask, window_f)
    m = None if f is None else level_region(moving_img, moving_mask, window_m)
    if m is None:
        return None
    back = _carry(m, spacing_m, spacing_f, fixed_mask.shape, matrix)
    iou = (f & back).sum() / max(1, (f | back).sum())
    return (f, m) if iou >= MIN_IOU else None


def redraw_pairs(pairs: list, fixed: Tensor, moving: Tensor, matrix: np.ndarray, spacing_fixed: Sequence[float],
                 spacing_moving: Sequence[float], axis: int | None = None) -> list:
    """The pairs whose two masks redraw consistently, with their redrawn masks (module docstring).

    Args:
        pairs: :class:`~fmreg.correspond.pairs.RoiPair` list, masks on the images' grids (in
            3D lifted from slices ``fixed_slice`` / ``moving_slice`` along ``axis``).
        fixed, moving: ``(H, W)`` images, or in 3D volumes sliced along ``axis``.
        matrix: ``(3, 3)`` in-plane similarity, fixed slice mm to moving slice mm.
        spacing_fixed, spacing_moving: In-plane ``(row, column)`` spacing, mm.
        axis: The through-plane array axis of 3D images, else None.

    Returns:
        The kept pairs, in order, with only their masks replaced.
    """
    sigma = max(*spacing_fixed, *spacing_moving)
    smooth: dict[tuple[str, int | None], np.ndarray] = {}

    def image(which: str, volume: Tensor, index: int | None, spacing) -> np.ndarray:
        if (which, index) not in smooth:
            plane = volume if index is None else volume.select(axis, index)
            smooth[which, index] = _smoothed(plane, spacing, sigma)
        return smooth[which, index]

    def plane(mask: Tensor, index: int | None) -> np.ndarray:
        return (mask if index is None else mask.select(axis, index)).numpy().astype(bool)

    def lift(region: np.ndarray, like: Tensor, index: int | None) -> Tensor:
        if index is None:
            return torch.from_numpy(region)
        out = torch.zeros(like.shape, dtype=torch.bool)
        out.select(axis, index).copy_(torch.from_numpy(region))
        return out

    kept = []
    for p in pairs:
        fm, mm = plane(p.fixed_mask, p.fixed_slice), plane(p.moving_mask, p.moving_slice)
        if not fm.any() or not mm.any():
            continue
        drawn = _redraw_one(image("f", fixed, p.fixed_slice, spacing_fixed), image("m", moving, p.moving_slice, spacing_moving),
                            fm, mm, spacing_fixed, spacing_moving, matrix)
        if drawn is not None:
            kept.append(replace(p, fixed_mask=lift(drawn[0], p.fixed_mask, p.fixed_slice),
                                moving_mask=lift(drawn[1], p.moving_mask, p.moving_slice)))
    return kept
