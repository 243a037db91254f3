"""Matched ROI pairs drawn on the fixed and the moving image, in one PNG."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
from torch import Tensor

from fmreg.core.grid import Grid
from fmreg.core.image import Image
from fmreg.errors import FmregError
from fmreg.figures.layout import (
    BACKGROUND, Panel, View, category_colour, choose_views, compose, display_window, grey_panel,
    label_masks, legend, mm_per_pixel, overlay, resample, save_png, screen_size, slice_in,
    text_width, to_numpy, widest,
)

__all__ = ["REJECTED_COLOUR", "RoiPairView", "roi_pairs_title", "save_roi_pairs"]

#: Outline colour of a pair the fit rejected (drawn dashed and unfilled, so kept pairs stand out).
REJECTED_COLOUR = (150, 150, 150)


@dataclass
class RoiPairView:
    """One matched ROI pair to draw.

    Attributes:
        fixed_mask: Bool tensor of shape ``fixed.grid.shape`` (array order).
        moving_mask: Bool tensor of shape ``moving.grid.shape`` (array order).
        similarity: Matching score shown in the legend (e.g. cosine similarity of
            prototypes, unitless).
        label: Pair number written on both masks.
        kept: False for a pair the fit rejected (e.g. one the image fit contradicts): drawn as a
            grey dashed outline and marked "rejected" in the legend.
    """

    fixed_mask: Tensor
    moving_mask: Tensor
    similarity: float
    label: int
    kept: bool = True

    @property
    def colour(self) -> tuple[int, int, int]:
        return category_colour(self.label) if self.kept else REJECTED_COLOUR


def roi_pairs_title(pairs: Sequence[RoiPairView]) -> str:
    """The figure's title: how many matched pairs the fit kept (e.g. ``"2 of 5 matched ROI pairs kept"``)."""
    if not pairs:
        return "no ROI pairs"
    kept = sum(1 for p in pairs if p.kept)
    return f"{kept} of {len(pairs)} matched ROI pair{'s' if len(pairs) != 1 else ''} kept by the fit"


def save_roi_pairs(path: str | Path, fixed: Image, moving: Image, pairs: Sequence[RoiPairView]) -> Path:
    """Draw matched ROI pairs on the fixed and moving images and write a PNG.

    Each kept pair gets one colour: a translucent fill and an outline of its mask on both images,
    with its number at the mask's centroid; a rejected pair only a grey dashed outline. The
    title says how many of the matched pairs were kept (:func:`roi_pairs_title`). A 3D pair shows up to four rows: the fixed slices
    (across the coarsest-spacing axis) that cut the most pairs, each beside the moving slice
    that cuts the most of those pairs' moving masks.

    Args:
        path: Destination ``.png``; written atomically.
        fixed: Fixed image.
        moving: Moving image (its own grid).
        pairs: Pairs to draw; none gives a picture of the two images saying "no ROI pairs".

    Returns:
        ``path``.

    Raises:
        FmregError: A mask does not have its image's grid shape.
    """
    fixed_side, moving_side = _sides(fixed, moving, pairs)
    plan = plan_rows(fixed.grid, moving.grid, fixed_side.masks, moving_side.masks)
    shown = [v for fv, mv, _ in plan for v in (fv, mv)]
    mmpp = mm_per_pixel(shown, 3 * widest(shown))
    rows = []
    for fv, mv, idx in plan:
        f_rgb = fixed_side.draw(fv, mmpp, pairs, idx)
        m_rgb = moving_side.draw(mv, mmpp, pairs, idx)
        pair_legend = _legend(pairs, idx, max(f_rgb.shape[0], m_rgb.shape[0]))
        rows.append((_caption(fv, mv), [Panel("fixed", f_rgb), Panel("moving", m_rgb), Panel("pairs", pair_legend)]))
    title = roi_pairs_title(pairs)
    drawn = {i for _, _, idx in plan for i in idx}
    missing = [str(p.label) for i, p in enumerate(pairs) if i not in drawn]
    footer = [f"not shown (no room, or an empty fixed mask): pairs {', '.join(missing)}"] if missing else []
    return save_png(compose(rows, title, footer), path)


def plan_rows(
    fixed_grid: Grid,
    moving_grid: Grid,
    fixed_masks: Sequence[np.ndarray],
    moving_masks: Sequence[np.ndarray],
    max_rows: int = 4,
) -> list[tuple[View, View, list[int]]]:
    """Rows of an ROI-pair figure: ``(fixed view, moving view, indices of pairs drawn)``.

    The busiest fixed slices come first (see :func:`choose_views`). The pairs cut by a fixed slice
    are shown beside the moving slice that cuts most of their moving masks (ties: the slice
    at the same world position); pairs whose moving masks lie elsewhere get further rows
    with the same fixed slice, until ``max_rows`` rows are used. A pair whose moving mask is
    empty is drawn on the fixed side only.
    """
    rows: list[tuple[View, View, list[int]]] = []
    for fv in choose_views(fixed_grid, list(fixed_masks), limit=max_rows):
        todo = [i for i, m in enumerate(fixed_masks) if fv.take(m).any()]
        near = slice_in(fv, moving_grid)
        if not rows and not todo:  # no pairs at all: still show both images
            rows.append((fv, choose_views(moving_grid, [], near=near)[0], []))
        while todo and len(rows) < max_rows:
            mv = choose_views(moving_grid, [moving_masks[i] for i in todo], limit=1, near=near)[0]
            here = [i for i in todo if mv.take(moving_masks[i]).any()] or todo
            rows.append((fv, mv, here))
            todo = [i for i in todo if i not in here]
    return rows


@dataclass
class _Side:
    """One image of the pair with the pairs' masks on it.

    Attributes:
        data: Intensities, ``grid.shape``.
        window: Their display window.
        masks: Bool masks of the pairs, in the order of the pairs, each ``grid.shape``.
    """

    data: np.ndarray
    window: tuple[float, float]
    masks: list[np.ndarray]

    def draw(self, view: View, mmpp: float, pairs: Sequence[RoiPairView], idx: list[int]) -> np.ndarray:
        """The cut ``view`` with the masks of ``pairs[i]``, ``i`` in ``idx``, filled, outlined and numbered."""
        size = screen_size(view, mmpp)
        cut = [(resample(view.take(self.masks[i]), size, 0), i) for i in idx]
        rgb = overlay(grey_panel(view.take(self.data), self.window, size),
                      [(m, pairs[i].colour) for m, i in cut if pairs[i].kept])
        rgb = overlay(rgb, [(m, pairs[i].colour) for m, i in cut if not pairs[i].kept], alpha=0.0, dashed=True)
        return label_masks([(m, str(pairs[i].label)) for m, i in cut], rgb)


def _sides(fixed: Image, moving: Image, pairs: Sequence[RoiPairView]) -> tuple[_Side, _Side]:
    """The fixed and the moving side of the figure.

    Raises:
        FmregError: A mask does not have its image's grid shape.
    """
    fixed_masks, moving_masks = [], []
    for p in pairs:
        fm, mm = to_numpy(p.fixed_mask).astype(bool), to_numpy(p.moving_mask).astype(bool)
        if fm.shape != fixed.grid.shape or mm.shape != moving.grid.shape:
            raise FmregError(
                f"ROI pair {p.label}: mask shapes {fm.shape} / {mm.shape} differ from the image "
                f"grids {fixed.grid.shape} / {moving.grid.shape}"
            )
        fixed_masks.append(fm)
        moving_masks.append(mm)
    fixed_data, moving_data = to_numpy(fixed.data).astype(np.float32), to_numpy(moving.data).astype(np.float32)
    return (
        _Side(fixed_data, display_window(fixed_data), fixed_masks),
        _Side(moving_data, display_window(moving_data), moving_masks),
    )


def _caption(fv: View, mv: View) -> str:
    """Which fixed and moving slices a row shows; empty for a 2D pair (whole images)."""
    if fv.grid.ndim != 3:
        return ""
    return f"fixed {fv.caption().split(';')[0]}  ↔  moving {mv.caption().split(';')[0]}"


def _legend(pairs: Sequence[RoiPairView], idx: list[int], height: int) -> np.ndarray:
    """Colour, number and similarity of the pairs ``idx`` drawn in a row."""
    entries = [(f"#{pairs[i].label}  similarity {pairs[i].similarity:.3f}{'' if pairs[i].kept else '  rejected'}",
                pairs[i].colour) for i in idx]
    # With no pairs the legend says so, which also keeps the figure as wide as usual.
    entries = entries or [("no ROI pairs", BACKGROUND)]
    # Swatch and margins take 26 px; "rejected" entries need more than the usual 200.
    return legend(entries, height, width=max(200, 26 + max(text_width(t, 13) for t, _ in entries)))
