"""Jacobian determinant pictures: the colour scale, the panel with its colour bar, the map.

:func:`jacobian_colours` draws white at ``det J = 1``, blue for shrinking and red for growing
(log scale, symmetric, so ``J`` and ``1/J`` are equally strong), and a green that appears
nowhere else for folding (``det J ≤ 0``).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from PIL import Image as PILImage
from PIL import ImageDraw
from torch import Tensor

from fmreg.core.grid import Grid
from fmreg.errors import FmregError
from fmreg.figures.layout import (
    BACKGROUND, Panel, choose_views, compose, mm_per_pixel, resample, save_png, screen_size,
    text_width, to_numpy, write_text,
)

__all__ = ["FOLD_COLOUR", "NAN_COLOUR", "NEUTRAL_COLOUR", "jacobian_colours", "save_jacobian_map"]

#: Colour of ``det J = 1`` (no volume change).
NEUTRAL_COLOUR = (255, 255, 255)
#: Colour of folding, ``det J ≤ 0``; a hue the blue–white–red scale never reaches.
FOLD_COLOUR = (0, 200, 0)
#: Colour of an undefined determinant (NaN).
NAN_COLOUR = (128, 128, 128)
_SHRINK_COLOUR = (33, 80, 190)
_GROW_COLOUR = (190, 30, 35)


def jacobian_colours(jac: Tensor | np.ndarray, limit: float = 2.0) -> np.ndarray:
    """Map Jacobian determinants to RGB on a diverging, log-symmetric scale centred at 1.

    Args:
        jac: Determinants, any shape.
        limit: Determinant (> 1) drawn in full red; ``1 / limit`` is drawn in full blue.

    Returns:
        ``uint8`` array of shape ``(*jac.shape, 3)``: exactly :data:`NEUTRAL_COLOUR` at 1,
        exactly :data:`FOLD_COLOUR` where ``jac ≤ 0``, :data:`NAN_COLOUR` where NaN.
    """
    j = to_numpy(jac).astype(np.float64)
    if not limit > 1:
        raise FmregError(f"Jacobian colour limit must exceed 1, got {limit}")
    positive = j > 0
    t = np.zeros(j.shape)
    t[positive] = np.clip(np.log(j[positive]) / math.log(limit), -1.0, 1.0)
    white = np.asarray(NEUTRAL_COLOUR, dtype=np.float64)
    end = np.where((t < 0)[..., None], np.asarray(_SHRINK_COLOUR, float), np.asarray(_GROW_COLOUR, float))
    rgb = white + np.abs(t)[..., None] * (end - white)
    rgb[~positive & ~np.isnan(j)] = FOLD_COLOUR
    rgb[np.isnan(j)] = NAN_COLOUR
    return np.rint(rgb).astype(np.uint8)


def jacobian_limit(jac: np.ndarray) -> float:
    """A colour-scale limit that shows the bulk of the determinants.

    It is the 99.5th percentile of ``|log J|`` over unfolded voxels, kept within [1.25, 4] so
    that a near-identity field is not rendered as wild colour and a wild one still shows
    structure; 2 when no voxel is unfolded and finite.
    """
    j = jac[np.isfinite(jac) & (jac > 0)]
    if j.size == 0:
        return 2.0
    return float(np.clip(math.exp(np.percentile(np.abs(np.log(j)), 99.5)), 1.25, 4.0))


def jacobian_panel(jac2d: np.ndarray, size: tuple[int, int], limit: float, stats: str) -> np.ndarray:
    """Colour-mapped determinants with a colour bar, a folding swatch and ``stats`` below.

    Args:
        jac2d: Determinants of one cut, ``(rows, cols)`` voxels.
        size: ``(rows, cols)`` in screen pixels of the map.
        limit: Colour-scale limit (see :func:`jacobian_colours`).
        stats: Text line under the colour bar (see :func:`jacobian_stats`).

    Returns:
        ``uint8`` RGB panel, at least as wide as the map and 52 pixels taller.
    """
    rgb = jacobian_colours(resample(jac2d, size, order=0), limit)
    width = max(size[1], 180, text_width(stats, 11) + 4)
    strip = PILImage.new("RGB", (width, 52), BACKGROUND)
    draw = ImageDraw.Draw(strip)
    swatch = 24
    bar_x0, bar_x1 = swatch + 16, width - 4
    draw.rectangle((2, 4, swatch, 14), fill=FOLD_COLOUR)
    write_text(draw, (2, 17), "≤0", 11)
    values = limit ** np.linspace(-1.0, 1.0, bar_x1 - bar_x0 + 1)  # log-spaced, like the map
    bar = np.repeat(jacobian_colours(values, limit)[None], 11, axis=0)
    strip.paste(PILImage.fromarray(bar), (bar_x0, 4))
    for x, text, anchor in ((bar_x0, f"{1 / limit:.2f}", "la"), ((bar_x0 + bar_x1) / 2, "1", "ma"), (bar_x1, f"{limit:.2f}", "ra")):
        write_text(draw, (x, 17), text, 11, anchor=anchor)
    write_text(draw, (2, 34), stats, 11)
    panel = np.full((size[0] + strip.height, width, 3), BACKGROUND, np.uint8)
    panel[: size[0], : size[1]] = rgb
    panel[size[0]:] = np.asarray(strip)
    return panel


def jacobian_stats(jac: np.ndarray) -> str:
    """Range and folding percentage over the whole array (not only the slice shown)."""
    finite = jac[np.isfinite(jac)]
    if finite.size == 0:
        return "no finite values"
    folding = 100.0 * float((finite <= 0).mean())
    where = "volume: " if jac.ndim == 3 else ""
    return f"{where}min {finite.min():.3g}  max {finite.max():.3g}  folding {folding:.2f}%"


def save_jacobian_map(path: str | Path, jacobian: Tensor, grid: Grid) -> Path:
    """Draw a Jacobian determinant map (one panel per view of :func:`choose_views`); write a PNG.

    Args:
        path: Destination ``.png``; written atomically.
        jacobian: ``det ∂T/∂x``, shape ``grid.shape`` (array order).
        grid: The grid it is sampled on (for slice choice and aspect ratio).

    Returns:
        ``path``.

    Raises:
        FmregError: ``jacobian`` does not have ``grid``'s shape.
    """
    jac = to_numpy(jacobian).astype(np.float64)
    if jac.shape != grid.shape:
        raise FmregError(f"Jacobian has shape {jac.shape}, grid has shape {grid.shape}")
    limit = jacobian_limit(jac)
    stats = jacobian_stats(jac)
    views = choose_views(grid)
    mmpp = mm_per_pixel(views, sum(v.extent_mm[1] for v in views))
    panels = [
        Panel(view.caption().split(";")[0] or "det J", jacobian_panel(view.take(jac), screen_size(view, mmpp), limit, stats))
        for view in views
    ]
    footer = [f"{grid.describe()}; white = 1 (no volume change), blue shrinks, red grows, green folds"]
    return save_png(compose([("", panels)], "Jacobian determinant", footer), path)
