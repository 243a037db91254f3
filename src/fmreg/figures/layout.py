"""What every figure shares: slices, screen scale, panels, text, layout and the atomic write.

Conventions shared by every figure:

* **Orientation.** A slice is shown in array order: row 0 of the slice at the top, column 0
  at the left (for a 2D image this is how it looks in any viewer; a slice of a 3D stack
  keeps the same rule, so nothing is flipped behind the reader's back).
* **Aspect.** One screen pixel is the same number of millimetres along both axes of every
  panel of a figure, so an 8 mm slice is drawn eight times taller than a 1 mm pixel.
* **Which slices.** 2D images are shown whole. For 3D, :func:`choose_views` picks one slice per
  row: the middle slice across the coarsest-spacing axis (the slice axis of a stack such as
  ACDC), then the middle slices across the two other axes, which show the stack edge-on.
* **Intensities** are windowed per image between its 1st and 99th percentiles
  (:func:`fmreg.core.intensity.percentile_window`).
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

from fmreg.core.grid import Frame, Grid, through_plane_axis
from fmreg.core.intensity import percentile_window
from fmreg.io.outputs import atomic_path

#: Figure background; also the swatch of a legend entry that should show no colour.
BACKGROUND = (24, 24, 24)
_TEXT = (235, 235, 235)
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


def category_colour(k: int) -> tuple[int, int, int]:
    """Colour of ROI pair or label ``k`` (1-based; the palette repeats after 16)."""
    return _PALETTE[(int(k) - 1) % len(_PALETTE)]


# ---------------------------------------------------------------------------- slices
@dataclass(frozen=True)
class View:
    """A 2D cut through an array of shape ``grid.shape``.

    ``axis`` is the array axis across the cut (``None``: the image is 2D) and ``index`` the
    slice along it. The shown rows and columns are the remaining axes in array order.
    """

    grid: Grid
    axis: int | None
    index: int

    @property
    def axes(self) -> tuple[int, int]:
        """Array axes shown as ``(rows, columns)``."""
        rows, cols = [k for k in range(self.grid.ndim) if k != self.axis]
        return rows, cols

    @property
    def shape(self) -> tuple[int, int]:
        """Voxels along ``(rows, columns)``."""
        r, c = self.axes
        return self.grid.shape[r], self.grid.shape[c]

    @property
    def extent_mm(self) -> tuple[float, float]:
        """Physical ``(height, width)`` of the cut in mm."""
        r, c = self.axes
        sp = self.grid.spacing_array
        return self.grid.shape[r] * sp[r], self.grid.shape[c] * sp[c]

    @property
    def finest_mm(self) -> float:
        """The finer of the two in-cut spacings (mm)."""
        r, c = self.axes
        return min(self.grid.spacing_array[r], self.grid.spacing_array[c])

    def take(self, arr: np.ndarray) -> np.ndarray:
        """The cut of ``arr`` ``(..., *grid.shape)``: ``(..., rows, cols)``."""
        if self.axis is None:
            return arr
        return np.take(arr, self.index, axis=arr.ndim - self.grid.ndim + self.axis)

    def caption(self) -> str:
        """Which slice this is and which axes are shown, in ITK names; empty for 2D."""
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


def choose_views(
    grid: Grid,
    masks: Sequence[np.ndarray] | None = None,
    limit: int = 3,
    near: float | None = None,
) -> list[View]:
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
        return [View(grid, None, 0)]
    a = through_plane_axis(grid)
    n = grid.shape[a]
    if masks is None:
        views = [View(grid, a, n // 2)]
        if n > 1:
            views += [View(grid, k, grid.shape[k] // 2) for k in range(3) if k != a]
        return views[:limit]
    near = n // 2 if near is None else near
    if len(masks) == 0:
        return [View(grid, a, int(np.clip(round(near), 0, n - 1)))]
    other = tuple(k for k in range(3) if k != a)
    areas = np.stack([m.sum(axis=other) for m in masks])  # (n_masks, n_slices)
    hits = (areas > 0).sum(axis=0)
    order = sorted(range(n), key=lambda s: (-hits[s], round(abs(s - near), 6), -areas[:, s].sum()))
    chosen = [s for s in order[:limit] if hits[s] > 0] or [order[0]]
    return [View(grid, a, s) for s in sorted(chosen)]


def slice_in(view: View, other: Grid) -> float | None:
    """Continuous index, along ``other``'s coarsest-spacing axis, of the centre of ``view``'s
    slice: where the same anatomy is when both images are aligned in world space."""
    if view.axis is None or other.ndim != 3:
        return None
    centre = (np.asarray(view.grid.size, dtype=np.float64) - 1) / 2
    centre[view.grid.ndim - 1 - view.axis] = view.index
    world = view.grid.convert_points(torch.as_tensor(centre), Frame.VOXEL, Frame.PHYSICAL)
    index = other.convert_points(world, Frame.PHYSICAL, Frame.VOXEL)
    return float(index[other.ndim - 1 - through_plane_axis(other)])


def mm_per_pixel(views: Sequence[View], row_mm: float) -> float:
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


def widest(views: Sequence[View]) -> float:
    """Physical width (mm) of the widest of ``views``."""
    return max(v.extent_mm[1] for v in views)


def screen_size(view: View, mm_per_px: float) -> tuple[int, int]:
    """``(rows, cols)`` in screen pixels of ``view`` drawn at ``mm_per_px``; at least 1 each."""
    rows_mm, cols_mm = view.extent_mm
    return max(1, round(rows_mm / mm_per_px)), max(1, round(cols_mm / mm_per_px))


def to_screen(index: np.ndarray, n: int, size: int) -> np.ndarray:
    """Continuous voxel index along an axis of ``n`` voxels → screen pixel coordinate."""
    return (index + 0.5) * (size / n) - 0.5


def resample(arr: np.ndarray, size: tuple[int, int], order: int) -> np.ndarray:
    """Resize a 2D slice to ``size`` screen pixels; ``order`` 0 keeps values (labels, masks,
    determinants), 1 interpolates linearly (intensities). Voxel centres map to
    :func:`to_screen` positions, so drawings made with it line up with the pixels."""
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
def to_numpy(t: Tensor | np.ndarray) -> np.ndarray:
    """A NumPy array of ``t`` (detached and on the CPU for a tensor)."""
    if isinstance(t, Tensor):
        return t.detach().cpu().numpy()
    return np.asarray(t)


def display_window(arr: np.ndarray) -> tuple[float, float]:
    """Robust display range: the 1st and 99th percentiles of the finite values."""
    lo, hi = percentile_window(arr)
    return lo, hi if hi > lo else lo + 1.0


def grey_panel(arr2d: np.ndarray, window: tuple[float, float], size: tuple[int, int]) -> np.ndarray:
    """Windowed intensities as an RGB ``uint8`` panel of ``size`` screen pixels."""
    lo, hi = window
    v = resample(np.nan_to_num(arr2d.astype(np.float32), nan=lo), size, order=1)
    g = np.clip((v - lo) / (hi - lo) * 255.0, 0, 255).astype(np.uint8)
    return np.repeat(g[..., None], 3, axis=-1)


def _outline(mask: np.ndarray) -> np.ndarray:
    """A 2-pixel line along the boundary of a screen-resolution mask (one pixel each side)."""
    return ndimage.binary_dilation(mask) & ~ndimage.binary_erosion(mask)


def overlay(
    rgb: np.ndarray,
    masks: Sequence[tuple[np.ndarray, tuple[int, int, int]]],
    alpha: float = 0.35,
    dashed: bool = False,
) -> np.ndarray:
    """Translucent fills and solid (or dashed) outlines of screen-resolution masks.

    Args:
        rgb: ``(H, W, 3)`` panel to draw on (not modified).
        masks: ``(mask, colour)`` pairs, each mask bool ``(H, W)``.
        alpha: Opacity of the fills; 0 draws outlines only.
        dashed: Draw the outlines dashed, so a second set of outlines stays distinguishable.

    Returns:
        A new ``uint8`` panel.
    """
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


def text_width(text: str, size: int) -> int:
    """Width in screen pixels of ``text`` written by :func:`write_text` at font ``size``."""
    return int(math.ceil(_font(size).getlength(text.translate(_ASCII))))


def write_text(draw: ImageDraw.ImageDraw, xy: tuple[float, float], text: str, size: int = 13,
           fill=_TEXT, anchor: str = "la", outline: bool = False) -> None:
    """Write ``text`` at ``xy`` (Pillow ``anchor``); ``outline`` adds a black edge for text on images."""
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


def label_masks(masks: Sequence[tuple[np.ndarray, str]], rgb: np.ndarray) -> np.ndarray:
    """Write each text on its screen-resolution mask (see :func:`_anchor_point`)."""
    img = PILImage.fromarray(rgb)
    draw = ImageDraw.Draw(img)
    for mask, text in masks:
        if mask.any():
            write_text(draw, _anchor_point(mask), text, 14, anchor="mm", outline=True)
    return np.asarray(img)


@dataclass
class Panel:
    """One titled picture inside a row of a figure."""

    title: str
    pixels: np.ndarray  # (H, W, 3) uint8


def legend(entries: Sequence[tuple[str, tuple[int, int, int]]], height: int, width: int = 200) -> np.ndarray:
    """A list of colour swatches with text, cut off with "… N more" when it runs out of room."""
    img = PILImage.new("RGB", (width, max(height, 40)), BACKGROUND)
    draw = ImageDraw.Draw(img)
    line = 18
    room = max(1, (img.height - 4) // line)
    shown = entries if len(entries) <= room else entries[: room - 1]
    for i, (text, colour) in enumerate(shown):
        y = 4 + i * line
        draw.rectangle((4, y + 2, 16, y + 14), fill=tuple(colour))
        write_text(draw, (22, y + 1), text, 13)
    if len(shown) < len(entries):
        write_text(draw, (22, 4 + len(shown) * line + 1), f"… {len(entries) - len(shown)} more", 13)
    return np.asarray(img)


def compose(rows: Sequence[tuple[str, Sequence[Panel]]], title: str = "", footer: Sequence[str] = ()) -> PILImage.Image:
    """Lay out rows of titled panels under a figure title, with footer lines below.

    Each row is ``(caption, panels)``; panels in a row are aligned at the top.
    """
    title_h, caption_h, panel_title_h, footer_h = 24, 20, 18, 18
    row_sizes = []
    for caption, panels in rows:
        w = sum(p.pixels.shape[1] for p in panels) + _GAP * (len(panels) - 1)
        w = max([w, text_width(caption, 13)] + [text_width(p.title, 13) for p in panels])
        h = (caption_h if caption else 0) + panel_title_h + max(p.pixels.shape[0] for p in panels)
        row_sizes.append((w, h))
    text_w = [text_width(title, 16)] + [text_width(f, 12) for f in footer]
    width = 2 * _MARGIN + max([w for w, _ in row_sizes] + text_w)
    height = (
        2 * _MARGIN
        + (title_h if title else 0)
        + sum(h for _, h in row_sizes)
        + _GAP * (len(rows) - 1)
        + (_GAP + footer_h * len(footer) if footer else 0)
    )
    fig = PILImage.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(fig)
    y = _MARGIN
    if title:
        write_text(draw, (_MARGIN, y), title, 16)
        y += title_h
    for (caption, panels), (_, h) in zip(rows, row_sizes):
        top = y
        if caption:
            write_text(draw, (_MARGIN, y), caption, 13, fill=(180, 200, 255))
            y += caption_h
        x = _MARGIN
        for p in panels:
            write_text(draw, (x, y), p.title, 13)
            fig.paste(PILImage.fromarray(p.pixels), (x, y + panel_title_h))
            x += max(p.pixels.shape[1], text_width(p.title, 13)) + _GAP
        y = top + h + _GAP
    for line in footer:
        write_text(draw, (_MARGIN, y), line, 12, fill=(200, 200, 200))
        y += footer_h
    return fig


def save_png(fig: PILImage.Image, path: str | Path) -> Path:
    """Write ``fig`` to ``path`` as a PNG atomically (nothing partial is left if it fails)."""
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.save(tmp, format="PNG")
    return path

