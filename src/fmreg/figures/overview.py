"""The registration overview: a pair and its transform at a glance, in one PNG."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image as PILImage
from PIL import ImageDraw
from torch import Tensor

from fmreg.core.grid import Frame, check_same_grid
from fmreg.core.image import Image
from fmreg.errors import FmregError
from fmreg.figures.jacobian import jacobian_limit, jacobian_panel, jacobian_stats
from fmreg.figures.layout import (
    Panel, View, choose_views, compose, display_window, grey_panel, mm_per_pixel, save_png,
    screen_size, to_numpy, to_screen, widest,
)
from fmreg.transforms.displacement import DisplacementField, jacobian_determinant
from fmreg.transforms.warp import warp

__all__ = ["save_overview"]

_GRID_LINE = (255, 210, 40)


def save_overview(
    path: str | Path,
    fixed: Image,
    moving: Image,
    warped: Image,
    field: DisplacementField,
    jacobian: Tensor | None = None,
    title: str = "",
) -> Path:
    """Draw a registration result at a glance and write it as a PNG.

    Panels: fixed; moving resampled onto the fixed grid (identity transform); warped moving;
    a checkerboard of fixed and warped; the fixed grid's lines deformed by ``T``; the
    Jacobian determinant of ``T``. A 2D pair gives one row; a 3D pair one row per view of
    :func:`~fmreg.figures.layout.choose_views`.

    Args:
        path: Destination ``.png``; written atomically.
        fixed: Fixed image.
        moving: Moving image on its own grid.
        warped: Moving image warped onto the fixed grid.
        field: Fixed→moving displacement on the fixed grid (any frame).
        jacobian: ``det ∂T/∂x`` on the fixed grid, shape ``fixed.grid.shape``; computed from
            ``field`` when ``None``.
        title: Figure title.

    Returns:
        ``path``.

    Raises:
        FmregError: ``warped``, ``field`` or ``jacobian`` is not on the fixed grid.
    """
    for what, grid in (("warped image", warped.grid), ("displacement field", field.grid)):
        check_same_grid(grid, fixed.grid, what, "the fixed grid")
    # float32 throughout, as computed: float64 copies of a 3000² pair's arrays added 0.3 GB.
    jac = to_numpy(jacobian_determinant(field) if jacobian is None else jacobian).astype(np.float32, copy=False)
    if jac.shape != fixed.grid.shape:
        raise FmregError(f"Jacobian has shape {jac.shape}, expected the fixed grid's {fixed.grid.shape}")
    content = _OverviewContent.of(fixed, moving, warped, field, jac)
    views = choose_views(fixed.grid)
    mmpp = mm_per_pixel(views, 6 * widest(views))
    rows = [(view.caption(), content.row(view, screen_size(view, mmpp))) for view in views]
    return save_png(compose(rows, title, _footer(fixed, moving, field)), path)


@dataclass
class _OverviewContent:
    """What the overview's rows are drawn from, computed once for all views.

    Attributes:
        images: Fixed, moving on the fixed grid, and warped moving, each ``fixed.grid.shape``.
        windows: Display window of each of ``images``; the moving window serves both moving
            images, so that warping does not change how bright they look.
        mapped: ``T(x)`` in voxel indices of the fixed grid, ``(ndim, *fixed.grid.shape)``.
        jac: Jacobian determinants on the fixed grid.
        limit: Their colour-scale limit.
        stats: Their summary line.
    """

    images: list[np.ndarray]
    windows: list[tuple[float, float]]
    mapped: np.ndarray
    jac: np.ndarray
    limit: float
    stats: str

    @classmethod
    def of(cls, fixed: Image, moving: Image, warped: Image, field: DisplacementField, jac: np.ndarray) -> "_OverviewContent":
        moving_on_fixed = warp(moving, DisplacementField.identity(fixed.grid))
        moving_window = display_window(to_numpy(moving.data))
        return cls(
            images=[to_numpy(im.data).astype(np.float32, copy=False) for im in (fixed, moving_on_fixed, warped)],
            windows=[display_window(to_numpy(fixed.data)), moving_window, moving_window],
            mapped=to_numpy(field.mapped_points(Frame.VOXEL)).astype(np.float32, copy=False),
            jac=jac,
            limit=jacobian_limit(jac),
            stats=jacobian_stats(jac),
        )

    def row(self, view: View, size: tuple[int, int]) -> list[Panel]:
        """The six panels of one view, each ``size`` screen pixels (the Jacobian adds its bar)."""
        f, m, w = (grey_panel(view.take(a), win, size) for a, win in zip(self.images, self.windows))
        return [
            Panel("fixed", f),
            Panel("moving (fixed grid)", m),
            Panel("warped moving", w),
            Panel("checkerboard fixed/warped", _checkerboard(f, w)),
            Panel("deformation grid", _deformation_grid(f, self.mapped, view)),
            Panel("Jacobian determinant", jacobian_panel(view.take(self.jac), size, self.limit, self.stats)),
        ]


def _footer(fixed: Image, moving: Image, field: DisplacementField) -> list[str]:
    """The grids of the pair and the size of the displacement, in mm."""
    disp = np.linalg.norm(to_numpy(field.to(Frame.PHYSICAL).data), axis=0)
    return [
        f"fixed: {fixed.grid.describe()}; moving: {moving.grid.describe()}",
        f"displacement |u|: mean {disp.mean():.2f} mm, max {disp.max():.2f} mm; grid lines every "
        "~14 px show where T sends the fixed grid (projected onto each cut)",
    ]


def _deformation_grid(rgb: np.ndarray, mapped: np.ndarray, view: View, step_px: float = 14.0) -> np.ndarray:
    """Lines of the fixed grid moved to where ``T`` sends them, drawn over ``rgb``.

    Args:
        rgb: ``(H, W, 3)`` panel (the fixed image).
        mapped: ``(ndim, *grid.shape)`` ``T(x)`` in voxel indices of the fixed grid,
            components ``(x, y[, z])``.
        view: The cut shown; components across it are dropped (projection onto the panel).
        step_px: Wanted distance between neighbouring lines on screen.

    Returns:
        A new panel: ``rgb`` dimmed, so the lines stand out, with the lines drawn on it.
    """
    h, w = view.shape
    size = rgb.shape[:2]
    r_axis, c_axis = view.axes
    ndim = view.grid.ndim
    cut = view.take(mapped)
    rows = to_screen(cut[ndim - 1 - r_axis], h, size[0])
    cols = to_screen(cut[ndim - 1 - c_axis], w, size[1])
    img = PILImage.fromarray((rgb.astype(np.float32) * 0.6).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    r_step = max(1, round(step_px / (size[0] / h)))
    c_step = max(1, round(step_px / (size[1] / w)))
    for i in range(0, h, r_step):
        if w > 1:
            draw.line(list(zip(cols[i].tolist(), rows[i].tolist())), fill=_GRID_LINE, width=1)
    for j in range(0, w, c_step):
        if h > 1:
            draw.line(list(zip(cols[:, j].tolist(), rows[:, j].tolist())), fill=_GRID_LINE, width=1)
    return np.asarray(img)


def _checkerboard(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Alternate squares of two equally sized RGB panels, eight squares along the short side."""
    tile = max(4, min(a.shape[:2]) // 8)
    r, c = np.indices(a.shape[:2])
    pick_a = ((r // tile + c // tile) % 2 == 0)[..., None]
    return np.where(pick_a, a, b)
