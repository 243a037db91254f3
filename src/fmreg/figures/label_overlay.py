"""Fixed and warped label maps outlined over the fixed image, with each label's Dice, in one PNG."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from fmreg.core.image import Image, check_label_grid
from fmreg.evaluate.metrics import dice
from fmreg.figures.layout import (
    Panel, category_colour, choose_views, compose, display_window, grey_panel, legend,
    mm_per_pixel, overlay, resample, save_png, screen_size, to_numpy, widest,
)

__all__ = ["save_label_overlay"]


def save_label_overlay(path: str | Path, fixed: Image, labels_fixed: Image, labels_warped: Image) -> Path:
    """Outline the fixed and the warped moving label maps over the fixed image; write a PNG.

    Panels per view: fixed labels (fill and outline), warped labels (fill and outline), and
    both outlines together (fixed solid, warped dashed) so misalignment shows as two lines.
    The legend gives each label's Dice overlap between the two maps.

    Args:
        path: Destination ``.png``; written atomically.
        fixed: Fixed image.
        labels_fixed: Integer label map on the fixed grid.
        labels_warped: Moving label map warped onto the fixed grid.

    Returns:
        ``path``.

    Raises:
        FmregError: A label map is not on the fixed grid.
    """
    check_label_grid(labels_fixed, fixed)
    check_label_grid(labels_warped, fixed)
    data = to_numpy(fixed.data).astype(np.float32)
    lf, lw = to_numpy(labels_fixed.data).astype(np.int64), to_numpy(labels_warped.data).astype(np.int64)
    values = [int(v) for v in np.union1d(np.unique(lf), np.unique(lw)) if v != 0]
    scores = dice(torch.from_numpy(lw), torch.from_numpy(lf), values)
    entries = [(f"label {v}: {scores[v]:.3f}", category_colour(v)) for v in values]
    window = display_window(data)
    views = choose_views(fixed.grid)
    mmpp = mm_per_pixel(views, 4 * widest(views))
    rows = []
    for view in views:
        size = screen_size(view, mmpp)
        grey = grey_panel(view.take(data), window, size)
        cut_f, cut_w = (resample(view.take(lab), size, 0) for lab in (lf, lw))
        fm = [(cut_f == v, category_colour(v)) for v in values]
        wm = [(cut_w == v, category_colour(v)) for v in values]
        both = overlay(overlay(grey, fm, alpha=0.0), wm, alpha=0.0, dashed=True)
        panels = [
            Panel("fixed labels", overlay(grey, fm)),
            Panel("warped labels", overlay(grey, wm)),
            Panel("fixed solid, warped dashed", both),
        ]
        if not rows:  # Dice is over the whole volume: one legend is enough
            panels.append(Panel("labels (Dice)", legend(entries, size[0])))
        rows.append((view.caption(), panels))
    return save_png(compose(rows, "label overlay"), path)

