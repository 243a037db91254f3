"""The multi-resolution pyramid of a fit: level grids and the data resampled onto each level.

Everything runs on the fixed grid: moving masks and the moving image are resampled onto each
level's grid through world coordinates (identity transform) before the transform warps them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from fmreg.core.grid import Frame, Grid
from fmreg.core.intensity import resize
from fmreg.core.sampling import sample

if TYPE_CHECKING:
    from fmreg.core.image import Image


def level_grids(grid: Grid, levels: int) -> list[Grid]:
    """Coarse-to-fine grids spanning ``grid``'s extent. Only axes within 2× of the finest
    spacing are halved (a 7-slice cardiac stack keeps its 7 slices); axes under 16 voxels stay."""
    finest = min(grid.spacing)
    out = [grid]
    for _ in range(levels - 1):
        g = out[-1]
        shape = []
        for n, sp0 in zip(g.shape, grid.spacing_array):
            shrink = sp0 <= 2 * finest and n >= 16
            shape.append(max(2, (n - 1) // 2 + 1) if shrink else n)
        out.append(g.resized(shape))
    return out[::-1]


def control_shape(grid: Grid, spacing: float) -> list[int]:
    """Shape of a control grid over ``grid``'s extent with about ``spacing`` mm between points.

    An axis shorter than two control spacings keeps every voxel of ``grid``; no axis gets more
    control points than ``grid`` has voxels.
    """
    # Never more control points than the level has voxels: on coarse levels (and along the few
    # slices of a cardiac stack) a finer control grid adds integration cost, not detail.
    return [
        n if sp * (n - 1) < 2 * spacing else min(n, max(2, int(math.ceil(sp * (n - 1) / spacing)) + 1))
        for n, sp in zip(grid.shape, grid.spacing_array)
    ]


def antialias(image: Tensor, grid: Grid, level: Grid, sigma: float) -> Tensor:
    """Gaussian-smooth ``(*grid.shape)`` intensities before they are sampled on a coarser ``level``.

    Along an array axis where a level voxel spans ``f`` image voxels, the Gaussian has
    ``sigma · sqrt(f² − 1)`` image voxels: added to the image's own resolution (taken as
    ``sigma`` voxels) it gives ``sigma`` level voxels. Axes the level does not coarsen (the
    slices of a cardiac stack) are left alone. The moving image is matched axis by axis, as
    its voxels are resampled onto the level grid.
    """
    if sigma <= 0:
        return image
    from scipy.ndimage import gaussian_filter

    factors = [lv / sp for lv, sp in zip(level.spacing_array, grid.spacing_array)]
    sig = [sigma * math.sqrt(f * f - 1) if f > 1.01 else 0.0 for f in factors]
    if max(sig) == 0:
        return image
    return torch.from_numpy(gaussian_filter(image.numpy(), sig, mode="nearest").astype("float32"))


@dataclass
class Level:
    """The fit's data on one pyramid level (all on ``grid``, array order).

    Attributes:
        grid: The level's grid (a resampling of the fixed grid over the same extent).
        fixed_masks, moving_masks: ``(K, *grid.shape)`` float ROI masks, or None without pairs;
            the moving masks are resampled from the moving grid through world coordinates.
        support: ``(K, *grid.shape)`` slices of each fixed slice ROI (3D slice pairs), or None.
        pair_slices: ``(K,)`` the one slice (along ``slice_axis``) of each fixed slice ROI, or
            None (no slice pairs, or a ROI on several slices of this level).
        slice_axis: The array axis of ``pair_slices``.
        fixed_image, moving_image: ``(*grid.shape)`` intensities, or None without image term.
        overlap: ``(*grid.shape)`` weight in [0, 1] of each fixed voxel in the image term: where
            the fit's start maps it into the moving field of view; None when that is everywhere.
    """

    grid: Grid
    fixed_masks: Tensor | None = None
    moving_masks: Tensor | None = None
    support: Tensor | None = None
    pair_slices: Tensor | None = None
    slice_axis: int | None = None
    fixed_image: Tensor | None = None
    moving_image: Tensor | None = None
    overlap: Tensor | None = None


#: ROI masks resampled together by :func:`resample_masks`.
MASK_CHUNK = 16


def resample_masks(level: Level, fixed_masks: Tensor, moving_masks: Tensor, moving_grid: Grid,
                   slice_axis: int | None) -> None:
    """Put the ROI masks of both images on ``level.grid`` (in place).

    With ``slice_axis`` (3D ROIs segmented slice by slice), each moving mask is extruded along
    the axis and ``support`` keeps the ROI terms on the fixed mask's own slices: a pair then
    constrains only the in-plane mapping of its slice.
    """
    grid = level.grid
    pts = grid.coordinates(Frame.PHYSICAL)
    # A few masks at a time: float copies of a few hundred whole-grid masks took 2.6 GB at once
    # (each mask is resampled on its own, so the result is the same).
    step = MASK_CHUNK
    fm = torch.cat([resize(fixed_masks[i : i + step].float(), grid.shape) for i in range(0, len(fixed_masks), step)]
                   or [torch.zeros(0, *grid.shape)])
    mm = torch.cat([sample(moving_masks[i : i + step].float(), moving_grid, pts, fill=0.0)
                    for i in range(0, len(moving_masks), step)] or [torch.zeros(0, *grid.shape)])
    if slice_axis is not None:
        ax = slice_axis + 1
        mm = mm.amax(dim=ax, keepdim=True).expand_as(mm).contiguous()
        in_plane = tuple(d for d in range(1, grid.ndim + 1) if d != ax)
        on = fm.amax(dim=in_plane) > 0.01  # (K, n_slices)
        level.support = on.float().reshape(fm.shape[0], *[n if d == ax else 1 for d, n in enumerate(fm.shape) if d]).expand_as(fm)
        if bool((on.sum(dim=1) == 1).all()):
            level.pair_slices, level.slice_axis = on.float().argmax(dim=1), slice_axis
    level.fixed_masks, level.moving_masks = fm, mm


def resample_images(level: Level, fixed_image: Tensor, fixed_grid: Grid, moving_image: Tensor,
                    moving_grid: Grid, sigma: float) -> None:
    """Put both (normalised) images on ``level.grid``, anti-aliased by ``sigma`` level voxels (in place)."""
    grid = level.grid
    pts = grid.coordinates(Frame.PHYSICAL)
    level.fixed_image = resize(antialias(fixed_image, fixed_grid, grid, sigma)[None], grid.shape)[0]
    level.moving_image = sample(antialias(moving_image, moving_grid, grid, sigma), moving_grid, pts, fill=0.0)


def lncc_window(grid: Grid, window_mm: float) -> list[int]:
    """Odd LNCC window edge per array axis: ``window_mm`` in voxels, at least 3."""
    return [max(3, int(round(window_mm / sp)) | 1) for sp in grid.spacing_array]


def working_image(image: "Image", max_side: int, axis: int | None = None, max_voxels: int | None = None) -> "Image":
    """``image`` resampled (anti-aliased) so that no in-plane side exceeds ``max_side`` voxels
    and, with ``max_voxels``, the whole grid holds at most that many.

    Args:
        image: A 2D or 3D image.
        max_side: Largest in-plane side kept.
        axis: 3D: the through-plane array axis, resampled only for the voxel budget and only
            when its spacing is at most twice the finest (a 10 mm cardiac stack keeps its slices).
        max_voxels: Voxel budget (None: none); the axes that may shrink shrink by one factor.

    Returns:
        ``image`` itself when it is small enough, else a copy on ``image.grid.resized(...)`` (same
        field of view, first and last voxel centres kept).
    """
    from fmreg.core.image import Image

    shape = list(image.grid.shape)
    in_plane = [a for a in range(len(shape)) if a != axis]
    longest = max(shape[a] for a in in_plane)
    if longest > max_side:
        for a in in_plane:
            shape[a] = max(2, int(round((shape[a] - 1) * (max_side - 1) / (longest - 1))) + 1)
    if max_voxels is not None and math.prod(shape) > max_voxels:
        spacing = image.grid.spacing_array
        free = [a for a in range(len(shape)) if spacing[a] <= 2 * min(spacing) and shape[a] > 2]
        fixed_count = math.prod(shape[a] for a in range(len(shape)) if a not in free)
        factor = (max_voxels / fixed_count / math.prod(shape[a] for a in free)) ** (1 / max(1, len(free)))
        start = list(shape)
        while True:  # the end voxels stay, so a side shrinks a little less than the factor
            shape = [_shrunk(n, factor) if a in free else n for a, n in enumerate(start)]
            if math.prod(shape) <= max_voxels or factor < 1e-3:
                break
            factor *= 0.99
    if shape == list(image.grid.shape):
        return image
    grid = image.grid.resized(shape)
    data = antialias(image.data.float(), image.grid, grid, 0.5)
    return Image(resize(data[None], grid.shape)[0], grid)


def _shrunk(n: int, factor: float) -> int:
    """Voxels along an axis of ``n`` after scaling its spacing by about ``1 / factor`` (end voxels
    kept; rounded down, so that a voxel budget holds)."""
    return max(2, int(math.floor((n - 1) * factor)) + 1)