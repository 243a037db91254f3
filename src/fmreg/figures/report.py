"""Pictures people look at: registration overviews, ROI pairs, label overlays, Jacobian maps.

Every picture is a PNG written atomically (:func:`fmreg.io.images.atomic_path`), drawn with Pillow
and NumPy only. Conventions shared by all of them:

* **Orientation.** A slice is shown in array order: row 0 of the slice at the top, column 0
  at the left (for a 2D image this is how it looks in any viewer; a slice of a 3D stack
  keeps the same rule, so nothing is flipped behind the reader's back).
* **Aspect.** One screen pixel is the same number of millimetres along both axes of every
  panel of a figure, so an 8 mm slice is drawn eight times taller than a 1 mm pixel.
* **Which slices.** 2D images are shown whole. For 3D, :func:`_views` picks one slice per
  row: the middle slice across the coarsest-spacing axis (the slice axis of a stack such as
  ACDC), then the middle slices across the two other axes, which show the stack edge-on.
* **Intensities** are windowed per image between its 1st and 99th percentiles.
* **Jacobian determinants** use :func:`jacobian_colours`: white at 1, blue for shrinking,
  red for growing (log scale, symmetric), and a green that appears nowhere else for folding
  (``det ≤ 0``).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image as PILImage
from PIL import ImageDraw, ImageFont
from scipy import ndimage
from torch import Tensor

from fmreg.core.intensity import percentile_window
from fmreg.errors import FmregError
from fmreg.transforms.displacement import DisplacementField, jacobian_determinant, warp
from fmreg.core.grid import Frame, Grid, through_plane_axis
from fmreg.core.image import Image, check_label_grid
from fmreg.io.images import atomic_path
from fmreg.evaluate.metrics import dice

__all__ = [
    "FOLD_COLOUR",
    "NAN_COLOUR",
    "NEUTRAL_COLOUR",
    "RoiPairView",
    "jacobian_colours",
    "save_jacobian_map",
    "save_label_overlay",
    "save_overview",
    "save_roi_pairs",
]

#: Colour of ``det J = 1`` (no volume change).
NEUTRAL_COLOUR = (255, 255, 255)
#: Colour of folding, ``det J ≤ 0``; a hue the blue–white–red scale never reaches.
FOLD_COLOUR = (0, 200, 0)
#: Colour of an undefined determinant (NaN).
NAN_COLOUR = (128, 128, 128)
_SHRINK_COLOUR = (33, 80, 190)
_GROW_COLOUR = (190, 30, 35)

_BACKGROUND = (24, 24, 24)
_TEXT = (235, 235, 235)
_GRID_LINE = (255, 210, 40)
_MARGIN = 10
_GAP = 8
_MIN_FIGURE_WIDTH = 800
# Longest side of the largest panel, in screen pixels: small images are enlarged up to the
# lower bound, huge ones reduced to the upper bound.
_PANEL_SIDE = (256, 400)

# Distinct colours for ROI pairs and labels, cycled; chosen to stay apart from each other and
# readable both as a translucent fill and as a 2-pixel contour on grey.
_PALETTE = (
    (230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48),
    (145, 30, 180), (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212),
    (0, 128, 128), (220, 190, 255), (170, 110, 40), (255, 250, 200), (128, 0, 0),
    (170, 255, 195),
)


@dataclass
class RoiPairView:
    """One matched ROI pair to draw.

    Attributes:
        fixed_mask: Bool tensor of shape ``fixed.grid.shape`` (array order).
        moving_mask: Bool tensor of shape ``moving.grid.shape`` (array order).
        similarity: Matching score shown in the legend (e.g. cosine similarity of
            prototypes, unitless).
        label: Pair number written on both masks.
    """

    fixed_mask: Tensor
    moving_mask: Tensor
    similarity: float
    label: int


# ---------------------------------------------------------------------------- colours
def jacobian_colours(jac: Tensor | np.ndarray, limit: float = 2.0) -> np.ndarray:
    """Map Jacobian determinants to RGB on a diverging, log-symmetric scale centred at 1.

    Args:
        jac: Determinants, any shape.
        limit: Determinant (> 1) drawn in full red; ``1 / limit`` is drawn in full blue.

    Returns:
        ``uint8`` array of shape ``(*jac.shape, 3)``: exactly :data:`NEUTRAL_COLOUR` at 1,
        exactly :data:`FOLD_COLOUR` where ``jac ≤ 0``, :data:`NAN_COLOUR` where NaN.
    """
    j = _np(jac).astype(np.float64)
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


def _jacobian_limit(jac: np.ndarray) -> float:
    """A colour-scale limit that shows the bulk of the determinants: the 99.5th percentile
    of ``|log J|`` over unfolded voxels, kept within [1.25, 4] so that a near-identity
    field is not rendered as wild colour and a wild one still shows structure."""
    j = jac[np.isfinite(jac) & (jac > 0)]
    if j.size == 0:
        return 2.0
    return float(np.clip(math.exp(np.percentile(np.abs(np.log(j)), 99.5)), 1.25, 4.0))


def _category_colour(k: int) -> tuple[int, int, int]:
    return _PALETTE[(int(k) - 1) % len(_PALETTE)]


# ---------------------------------------------------------------------------- slices
@dataclass(frozen=True)
class _View:
    """A 2D cut through an array of shape ``grid.shape``.

    ``axis`` is the array axis across the cut (``None``: the image is 2D) and ``index`` the
    slice along it. The shown rows and columns are the remaining axes in array order.
    """

    grid: Grid
    axis: int | None
    index: int

    @property
    def axes(self) -> tuple[int, int]:
        rows, cols = [k for k in range(self.grid.ndim) if k != self.axis]
        return rows, cols

    @property
    def shape(self) -> tuple[int, int]:
        r, c = self.axes
        return self.grid.shape[r], self.grid.shape[c]

    @property
    def extent_mm(self) -> tuple[float, float]:
        r, c = self.axes
        sp = self.grid.spacing_array
        return self.grid.shape[r] * sp[r], self.grid.shape[c] * sp[c]

    @property
    def finest_mm(self) -> float:
        r, c = self.axes
        return min(self.grid.spacing_array[r], self.grid.spacing_array[c])

    def take(self, arr: np.ndarray) -> np.ndarray:
        """The cut of ``arr`` ``(..., *grid.shape)``: ``(..., rows, cols)``."""
        if self.axis is None:
            return arr
        return np.take(arr, self.index, axis=arr.ndim - self.grid.ndim + self.axis)

    def caption(self) -> str:
        if self.axis is None:
            return ""
        name = _axis_name(self.grid.ndim)
        r, c = self.axes
        n = self.grid.shape[self.axis]
        return (
            f"{name(self.axis)} = {self.index} (of 0–{n - 1}); rows {name(r)}, columns {name(c)}"
        )


def _axis_name(ndim: int):
    # Array axis k holds component ndim-1-k (see fmreg.core.grid), whose ITK name is x, y or z.
    return lambda k: "xyz"[ndim - 1 - k]


def _views(
    grid: Grid,
    masks: Sequence[np.ndarray] | None = None,
    limit: int = 3,
    near: float | None = None,
) -> list[_View]:
    """Choose the slices to draw.

    Args:
        grid: Grid of the arrays to cut.
        masks: ``None``: the middle slice across the coarsest-spacing axis, then the middle
            slices across the other axes (when the stack has more than one slice). Otherwise
            bool arrays of shape ``grid.shape``: the slices across the coarsest-spacing
            axis that intersect the most masks (ties: nearer ``near``, then more mask
            voxels), in increasing slice order.
        limit: At most this many views.
        near: Preferred slice index (continuous) among equally busy ones, and the slice
            returned when ``masks`` is empty; default the middle.

    Returns:
        Views; a single whole-image view for a 2D grid.
    """
    if grid.ndim == 2:
        return [_View(grid, None, 0)]
    a = through_plane_axis(grid)
    n = grid.shape[a]
    if masks is None:
        views = [_View(grid, a, n // 2)]
        if n > 1:
            views += [_View(grid, k, grid.shape[k] // 2) for k in range(3) if k != a]
        return views[:limit]
    near = n // 2 if near is None else near
    if len(masks) == 0:
        return [_View(grid, a, int(np.clip(round(near), 0, n - 1)))]
    other = tuple(k for k in range(3) if k != a)
    areas = np.stack([m.sum(axis=other) for m in masks])  # (n_masks, n_slices)
    hits = (areas > 0).sum(axis=0)
    order = sorted(range(n), key=lambda s: (-hits[s], round(abs(s - near), 6), -areas[:, s].sum()))
    chosen = [s for s in order[:limit] if hits[s] > 0] or [order[0]]
    return [_View(grid, a, s) for s in sorted(chosen)]


def _slice_in(view: _View, other: Grid) -> float | None:
    """Continuous index, along ``other``'s coarsest-spacing axis, of the centre of ``view``'s
    slice: where the same anatomy is when both images are aligned in world space."""
    if view.axis is None or other.ndim != 3:
        return None
    centre = (np.asarray(view.grid.size, dtype=np.float64) - 1) / 2
    centre[view.grid.ndim - 1 - view.axis] = view.index
    world = view.grid.convert_points(torch.as_tensor(centre), Frame.VOXEL, Frame.PHYSICAL)
    index = other.convert_points(world, Frame.PHYSICAL, Frame.VOXEL)
    return float(index[other.ndim - 1 - through_plane_axis(other)])


def _mm_per_pixel(views: Sequence[_View], row_mm: float) -> float:
    """Screen scale shared by all panels of one figure (mm per screen pixel).

    Args:
        views: Every view drawn in the figure.
        row_mm: Physical width of the widest row of panels (sum of its panels' widths).

    The largest panel's long side gets its native size (one screen pixel per finest voxel)
    clamped to :data:`_PANEL_SIDE`; panels are then enlarged further where the widest row
    would be narrower than :data:`_MIN_FIGURE_WIDTH`, but no long side exceeds that width.
    """
    longest = max(max(v.extent_mm) for v in views)
    native = longest / min(v.finest_mm for v in views)
    mm_per_px = longest / float(np.clip(native, *_PANEL_SIDE))
    mm_per_px = min(mm_per_px, row_mm / _MIN_FIGURE_WIDTH)
    return max(mm_per_px, longest / _MIN_FIGURE_WIDTH)


def _widest(views: Sequence[_View]) -> float:
    return max(v.extent_mm[1] for v in views)


def _screen_size(view: _View, mm_per_px: float) -> tuple[int, int]:
    rows_mm, cols_mm = view.extent_mm
    return max(1, round(rows_mm / mm_per_px)), max(1, round(cols_mm / mm_per_px))


def _to_screen(index: np.ndarray, n: int, size: int) -> np.ndarray:
    """Continuous voxel index along an axis of ``n`` voxels → screen pixel coordinate."""
    return (index + 0.5) * (size / n) - 0.5


def _resample(arr: np.ndarray, size: tuple[int, int], order: int) -> np.ndarray:
    """Resize a 2D slice to ``size`` screen pixels; ``order`` 0 keeps values (labels, masks,
    determinants), 1 interpolates linearly (intensities). Voxel centres map to
    :func:`_to_screen` positions, so drawings made with it line up with the pixels."""
    h, w = arr.shape
    rows = (np.arange(size[0]) + 0.5) * (h / size[0]) - 0.5
    cols = (np.arange(size[1]) + 0.5) * (w / size[1]) - 0.5
    if order == 0:
        ri = np.clip(np.floor(rows + 0.5).astype(int), 0, h - 1)
        ci = np.clip(np.floor(cols + 0.5).astype(int), 0, w - 1)
        return arr[np.ix_(ri, ci)]
    rr, cc = np.meshgrid(rows, cols, indexing="ij")
    return ndimage.map_coordinates(arr.astype(np.float32), [rr, cc], order=1, mode="nearest")


# ---------------------------------------------------------------------------- drawing
def _np(t: Tensor | np.ndarray) -> np.ndarray:
    if isinstance(t, Tensor):
        return t.detach().cpu().numpy()
    return np.asarray(t)


def _window(arr: np.ndarray) -> tuple[float, float]:
    """Robust display range: the 1st and 99th percentiles of the finite values."""
    lo, hi = percentile_window(arr)
    return lo, hi if hi > lo else lo + 1.0


def _grey(arr2d: np.ndarray, window: tuple[float, float], size: tuple[int, int]) -> np.ndarray:
    """Windowed intensities as an RGB ``uint8`` panel of ``size`` screen pixels."""
    lo, hi = window
    v = _resample(np.nan_to_num(arr2d.astype(np.float32), nan=lo), size, order=1)
    g = np.clip((v - lo) / (hi - lo) * 255.0, 0, 255).astype(np.uint8)
    return np.repeat(g[..., None], 3, axis=-1)


def _outline(mask: np.ndarray) -> np.ndarray:
    """A 2-pixel line along the boundary of a screen-resolution mask (one pixel each side)."""
    return ndimage.binary_dilation(mask) & ~ndimage.binary_erosion(mask)


def _overlay(
    rgb: np.ndarray,
    masks: Sequence[tuple[np.ndarray, tuple[int, int, int]]],
    alpha: float = 0.35,
    dashed: bool = False,
) -> np.ndarray:
    """Translucent fills and solid (or dashed) outlines of screen-resolution masks."""
    out = rgb.astype(np.float32)
    for mask, colour in masks:
        col = np.asarray(colour, np.float32)
        if alpha > 0:
            out[mask] = (1 - alpha) * out[mask] + alpha * col
        edge = _outline(mask)
        if dashed:
            r, c = np.indices(mask.shape)
            edge &= ((r // 4 + c // 4) % 2) == 0
        out[edge] = col
    return np.clip(out, 0, 255).astype(np.uint8)


@functools.lru_cache(maxsize=None)
def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has only the fixed bitmap font
        return ImageFont.load_default()


# Pillow's built-in font has no glyphs for these (it would draw boxes); messages from other
# modules (e.g. Grid.describe) use them, so they are spelled out at drawing time.
_ASCII = str.maketrans({"×": "x", "≤": "<=", "≥": ">=", "↔": "<->", "→": "->", "–": "-", "—": "-"})


def _text_width(text: str, size: int) -> int:
    return int(math.ceil(_font(size).getlength(text.translate(_ASCII))))


def _write(draw: ImageDraw.ImageDraw, xy: tuple[float, float], text: str, size: int = 13,
           fill=_TEXT, anchor: str = "la", outline: bool = False) -> None:
    extra = {"stroke_width": 2, "stroke_fill": (0, 0, 0)} if outline else {}
    draw.text(xy, text.translate(_ASCII), fill=tuple(fill), font=_font(size), anchor=anchor, **extra)


def _anchor_point(mask: np.ndarray) -> tuple[float, float]:
    """Where to write a mask's name: its centroid ``(x, y)`` in screen pixels, unless that
    falls outside the mask (rings, several blobs), then the mask's deepest pixel, so the
    number never lands on a neighbouring structure."""
    r, c = np.nonzero(mask)
    cr, cc = float(r.mean()), float(c.mean())
    if mask[int(round(cr)), int(round(cc))]:
        return cc, cr
    depth = ndimage.distance_transform_edt(np.pad(mask, 1))[1:-1, 1:-1]
    dr, dc = np.unravel_index(int(np.argmax(depth)), mask.shape)
    return float(dc), float(dr)


def _label_masks(masks: Sequence[tuple[np.ndarray, str]], rgb: np.ndarray) -> np.ndarray:
    """Write each text on its screen-resolution mask (see :func:`_anchor_point`)."""
    img = PILImage.fromarray(rgb)
    draw = ImageDraw.Draw(img)
    for mask, text in masks:
        if mask.any():
            _write(draw, _anchor_point(mask), text, 14, anchor="mm", outline=True)
    return np.asarray(img)


@dataclass
class _Panel:
    title: str
    pixels: np.ndarray  # (H, W, 3) uint8


def _legend(entries: Sequence[tuple[str, tuple[int, int, int]]], height: int, width: int = 200) -> np.ndarray:
    """A list of colour swatches with text, cut off with "… N more" when it runs out of room."""
    img = PILImage.new("RGB", (width, max(height, 40)), _BACKGROUND)
    draw = ImageDraw.Draw(img)
    line = 18
    room = max(1, (img.height - 4) // line)
    shown = entries if len(entries) <= room else entries[: room - 1]
    for i, (text, colour) in enumerate(shown):
        y = 4 + i * line
        draw.rectangle((4, y + 2, 16, y + 14), fill=tuple(colour))
        _write(draw, (22, y + 1), text, 13)
    if len(shown) < len(entries):
        _write(draw, (22, 4 + len(shown) * line + 1), f"… {len(entries) - len(shown)} more", 13)
    return np.asarray(img)


def _compose(rows: Sequence[tuple[str, Sequence[_Panel]]], title: str = "", footer: Sequence[str] = ()) -> PILImage.Image:
    """Lay out rows of titled panels under a figure title, with footer lines below.

    Each row is ``(caption, panels)``; panels in a row are aligned at the top.
    """
    title_h, caption_h, panel_title_h, footer_h = 24, 20, 18, 18
    row_sizes = []
    for caption, panels in rows:
        w = sum(p.pixels.shape[1] for p in panels) + _GAP * (len(panels) - 1)
        w = max([w, _text_width(caption, 13)] + [_text_width(p.title, 13) for p in panels])
        h = (caption_h if caption else 0) + panel_title_h + max(p.pixels.shape[0] for p in panels)
        row_sizes.append((w, h))
    text_w = [_text_width(title, 16)] + [_text_width(f, 12) for f in footer]
    width = 2 * _MARGIN + max([w for w, _ in row_sizes] + text_w)
    height = (
        2 * _MARGIN
        + (title_h if title else 0)
        + sum(h for _, h in row_sizes)
        + _GAP * (len(rows) - 1)
        + (_GAP + footer_h * len(footer) if footer else 0)
    )
    fig = PILImage.new("RGB", (width, height), _BACKGROUND)
    draw = ImageDraw.Draw(fig)
    y = _MARGIN
    if title:
        _write(draw, (_MARGIN, y), title, 16)
        y += title_h
    for (caption, panels), (_, h) in zip(rows, row_sizes):
        top = y
        if caption:
            _write(draw, (_MARGIN, y), caption, 13, fill=(180, 200, 255))
            y += caption_h
        x = _MARGIN
        for p in panels:
            _write(draw, (x, y), p.title, 13)
            fig.paste(PILImage.fromarray(p.pixels), (x, y + panel_title_h))
            x += max(p.pixels.shape[1], _text_width(p.title, 13)) + _GAP
        y = top + h + _GAP
    for line in footer:
        _write(draw, (_MARGIN, y), line, 12, fill=(200, 200, 200))
        y += footer_h
    return fig


def _save(fig: PILImage.Image, path: str | Path) -> Path:
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.save(tmp, format="PNG")
    return path


# ---------------------------------------------------------------------------- panels
def _jacobian_panel(jac2d: np.ndarray, size: tuple[int, int], limit: float, stats: str) -> np.ndarray:
    """Colour-mapped determinants with a colour bar, a folding swatch and ``stats`` below."""
    rgb = jacobian_colours(_resample(jac2d, size, order=0), limit)
    width = max(size[1], 180, _text_width(stats, 11) + 4)
    strip = PILImage.new("RGB", (width, 52), _BACKGROUND)
    draw = ImageDraw.Draw(strip)
    swatch = 24
    bar_x0, bar_x1 = swatch + 16, width - 4
    draw.rectangle((2, 4, swatch, 14), fill=FOLD_COLOUR)
    _write(draw, (2, 17), "≤0", 11)
    values = limit ** np.linspace(-1.0, 1.0, bar_x1 - bar_x0 + 1)  # log-spaced, like the map
    bar = np.repeat(jacobian_colours(values, limit)[None], 11, axis=0)
    strip.paste(PILImage.fromarray(bar), (bar_x0, 4))
    for x, text, anchor in ((bar_x0, f"{1 / limit:.2f}", "la"), ((bar_x0 + bar_x1) / 2, "1", "ma"), (bar_x1, f"{limit:.2f}", "ra")):
        _write(draw, (x, 17), text, 11, anchor=anchor)
    _write(draw, (2, 34), stats, 11)
    panel = np.full((size[0] + strip.height, width, 3), _BACKGROUND, np.uint8)
    panel[: size[0], : size[1]] = rgb
    panel[size[0]:] = np.asarray(strip)
    return panel


def _jacobian_stats(jac: np.ndarray) -> str:
    """Range and folding percentage over the whole array (not only the slice shown)."""
    finite = jac[np.isfinite(jac)]
    if finite.size == 0:
        return "no finite values"
    folding = 100.0 * float((finite <= 0).mean())
    where = "volume: " if jac.ndim == 3 else ""
    return f"{where}min {finite.min():.3g}  max {finite.max():.3g}  folding {folding:.2f}%"


def _deformation_grid(rgb: np.ndarray, mapped: np.ndarray, view: _View, step_px: float = 14.0) -> np.ndarray:
    """Lines of the fixed grid moved to where ``T`` sends them, drawn over ``rgb``.

    Args:
        rgb: ``(H, W, 3)`` panel (the fixed image).
        mapped: ``(ndim, *grid.shape)`` ``T(x)`` in voxel indices of the fixed grid,
            components ``(x, y[, z])``.
        view: The cut shown; components across it are dropped (projection onto the panel).
        step_px: Wanted distance between neighbouring lines on screen.
    """
    h, w = view.shape
    size = rgb.shape[:2]
    r_axis, c_axis = view.axes
    ndim = view.grid.ndim
    cut = view.take(mapped)
    rows = _to_screen(cut[ndim - 1 - r_axis], h, size[0])
    cols = _to_screen(cut[ndim - 1 - c_axis], w, size[1])
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


def _check_on_grid(what: str, grid: Grid, fixed: Image) -> None:
    if not grid.same_as(fixed.grid):
        raise FmregError(f"{what} ({grid.describe()}) is not on the fixed grid ({fixed.grid.describe()})")


def _roi_plan(
    fixed_grid: Grid,
    moving_grid: Grid,
    fixed_masks: Sequence[np.ndarray],
    moving_masks: Sequence[np.ndarray],
    max_rows: int = 4,
) -> list[tuple[_View, _View, list[int]]]:
    """Rows of an ROI-pair figure: ``(fixed view, moving view, indices of pairs drawn)``.

    The busiest fixed slices come first (see :func:`_views`). The pairs cut by a fixed slice
    are shown beside the moving slice that cuts most of their moving masks (ties: the slice
    at the same world position); pairs whose moving masks lie elsewhere get further rows
    with the same fixed slice, until ``max_rows`` rows are used. A pair whose moving mask is
    empty is drawn on the fixed side only.
    """
    rows: list[tuple[_View, _View, list[int]]] = []
    for fv in _views(fixed_grid, list(fixed_masks), limit=max_rows):
        todo = [i for i, m in enumerate(fixed_masks) if fv.take(m).any()]
        near = _slice_in(fv, moving_grid)
        if not rows and not todo:  # no pairs at all: still show both images
            rows.append((fv, _views(moving_grid, [], near=near)[0], []))
        while todo and len(rows) < max_rows:
            mv = _views(moving_grid, [moving_masks[i] for i in todo], limit=1, near=near)[0]
            here = [i for i in todo if mv.take(moving_masks[i]).any()] or todo
            rows.append((fv, mv, here))
            todo = [i for i in todo if i not in here]
    return rows


# ---------------------------------------------------------------------------- figures
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
    :func:`_views`.

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
    _check_on_grid("warped image", warped.grid, fixed)
    _check_on_grid("displacement field", field.grid, fixed)
    jac = _np(jacobian_determinant(field) if jacobian is None else jacobian).astype(np.float64)
    if jac.shape != fixed.grid.shape:
        raise FmregError(f"Jacobian has shape {jac.shape}, expected the fixed grid's {fixed.grid.shape}")
    moving_on_fixed = warp(moving, DisplacementField.identity(fixed.grid))
    images = [_np(im.data).astype(np.float32) for im in (fixed, moving_on_fixed, warped)]
    windows = [_window(_np(fixed.data)), _window(_np(moving.data)), _window(_np(moving.data))]
    mapped = _np(field.mapped_points(Frame.VOXEL)).astype(np.float64)
    limit = _jacobian_limit(jac)
    stats = _jacobian_stats(jac)

    views = _views(fixed.grid)
    mmpp = _mm_per_pixel(views, 6 * _widest(views))
    rows = []
    for view in views:
        size = _screen_size(view, mmpp)
        f, m, w = (_grey(view.take(a), win, size) for a, win in zip(images, windows))
        rows.append((view.caption(), [
            _Panel("fixed", f),
            _Panel("moving (fixed grid)", m),
            _Panel("warped moving", w),
            _Panel("checkerboard fixed/warped", _checkerboard(f, w)),
            _Panel("deformation grid", _deformation_grid(f, mapped, view)),
            _Panel("Jacobian determinant", _jacobian_panel(view.take(jac), size, limit, stats)),
        ]))
    disp = np.linalg.norm(_np(field.to(Frame.PHYSICAL).data), axis=0)
    footer = [
        f"fixed: {fixed.grid.describe()}; moving: {moving.grid.describe()}",
        f"displacement |u|: mean {disp.mean():.2f} mm, max {disp.max():.2f} mm; grid lines every "
        "~14 px show where T sends the fixed grid (projected onto each cut)",
    ]
    return _save(_compose(rows, title, footer), path)


def save_roi_pairs(path: str | Path, fixed: Image, moving: Image, pairs: Sequence[RoiPairView]) -> Path:
    """Draw matched ROI pairs on the fixed and moving images and write a PNG.

    Each pair gets one colour: a translucent fill and an outline of its mask on both images,
    with its number at the mask's centroid. A 3D pair shows up to four rows: the fixed slices
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
    fixed_masks, moving_masks = [], []
    for p in pairs:
        fm, mm = _np(p.fixed_mask).astype(bool), _np(p.moving_mask).astype(bool)
        if fm.shape != fixed.grid.shape or mm.shape != moving.grid.shape:
            raise FmregError(
                f"ROI pair {p.label}: mask shapes {fm.shape} / {mm.shape} differ from the image "
                f"grids {fixed.grid.shape} / {moving.grid.shape}"
            )
        fixed_masks.append(fm)
        moving_masks.append(mm)
    fixed_data, moving_data = _np(fixed.data).astype(np.float32), _np(moving.data).astype(np.float32)
    windows = _window(fixed_data), _window(moving_data)

    plan = _roi_plan(fixed.grid, moving.grid, fixed_masks, moving_masks)
    shown = [v for fv, mv, _ in plan for v in (fv, mv)]
    mmpp = _mm_per_pixel(shown, 3 * _widest(shown))

    def side(view: _View, data: np.ndarray, window, masks: list[np.ndarray], idx: list[int]) -> np.ndarray:
        size = _screen_size(view, mmpp)
        cut = [(_resample(view.take(masks[i]), size, 0), i) for i in idx]
        rgb = _overlay(_grey(view.take(data), window, size), [(m, _category_colour(pairs[i].label)) for m, i in cut])
        return _label_masks([(m, str(pairs[i].label)) for m, i in cut], rgb)

    rows = []
    for fv, mv, idx in plan:
        f_rgb = side(fv, fixed_data, windows[0], fixed_masks, idx)
        m_rgb = side(mv, moving_data, windows[1], moving_masks, idx)
        caption = ""
        if fixed.ndim == 3:
            caption = f"fixed {fv.caption().split(';')[0]}  ↔  moving {mv.caption().split(';')[0]}"
        entries = [(f"#{pairs[i].label}  similarity {pairs[i].similarity:.3f}", _category_colour(pairs[i].label)) for i in idx]
        # With no pairs the legend says so, which also keeps the figure as wide as usual.
        entries = entries or [("no ROI pairs", _BACKGROUND)]
        panels = [_Panel("fixed", f_rgb), _Panel("moving", m_rgb)]
        panels.append(_Panel("pairs", _legend(entries, max(f_rgb.shape[0], m_rgb.shape[0]))))
        rows.append((caption, panels))
    title = f"{len(pairs)} ROI pair{'s' if len(pairs) != 1 else ''}" if pairs else "no ROI pairs"
    drawn = {i for _, _, idx in plan for i in idx}
    missing = [str(p.label) for i, p in enumerate(pairs) if i not in drawn]
    footer = [f"not shown (no room, or an empty fixed mask): pairs {', '.join(missing)}"] if missing else []
    return _save(_compose(rows, title, footer), path)


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
    data = _np(fixed.data).astype(np.float32)
    lf, lw = _np(labels_fixed.data).astype(np.int64), _np(labels_warped.data).astype(np.int64)
    values = [int(v) for v in np.union1d(np.unique(lf), np.unique(lw)) if v != 0]
    scores = dice(torch.from_numpy(lw), torch.from_numpy(lf), values)
    entries = [(f"label {v}: {scores[v]:.3f}", _category_colour(v)) for v in values]
    window = _window(data)
    views = _views(fixed.grid)
    mmpp = _mm_per_pixel(views, 4 * _widest(views))
    rows = []
    for view in views:
        size = _screen_size(view, mmpp)
        grey = _grey(view.take(data), window, size)
        cut_f, cut_w = (_resample(view.take(lab), size, 0) for lab in (lf, lw))
        fm = [(cut_f == v, _category_colour(v)) for v in values]
        wm = [(cut_w == v, _category_colour(v)) for v in values]
        both = _overlay(_overlay(grey, fm, alpha=0.0), wm, alpha=0.0, dashed=True)
        panels = [
            _Panel("fixed labels", _overlay(grey, fm)),
            _Panel("warped labels", _overlay(grey, wm)),
            _Panel("fixed solid, warped dashed", both),
        ]
        if not rows:  # Dice is over the whole volume: one legend is enough
            panels.append(_Panel("labels (Dice)", _legend(entries, size[0])))
        rows.append((view.caption(), panels))
    return _save(_compose(rows, "label overlay"), path)


def save_jacobian_map(path: str | Path, jacobian: Tensor, grid: Grid) -> Path:
    """Draw a Jacobian determinant map (one panel per view of :func:`_views`); write a PNG.

    Args:
        path: Destination ``.png``; written atomically.
        jacobian: ``det ∂T/∂x``, shape ``grid.shape`` (array order).
        grid: The grid it is sampled on (for slice choice and aspect ratio).

    Returns:
        ``path``.
    """
    jac = _np(jacobian).astype(np.float64)
    if jac.shape != grid.shape:
        raise FmregError(f"Jacobian has shape {jac.shape}, grid has shape {grid.shape}")
    limit = _jacobian_limit(jac)
    stats = _jacobian_stats(jac)
    views = _views(grid)
    mmpp = _mm_per_pixel(views, sum(v.extent_mm[1] for v in views))
    panels = [
        _Panel(view.caption().split(";")[0] or "det J", _jacobian_panel(view.take(jac), _screen_size(view, mmpp), limit, stats))
        for view in views
    ]
    footer = [f"{grid.describe()}; white = 1 (no volume change), blue shrinks, red grows, green folds"]
    return _save(_compose([("", panels)], "Jacobian determinant", footer), path)
