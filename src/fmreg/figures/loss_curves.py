"""``loss.png``: the loss terms of a training run against the step (Pillow only).

One panel per term, each with its own vertical range, so a small inverse-consistency term is
not flattened against the similarity; a light line shows every step, a bold one the running
mean over about 2 % of the run.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image as PILImage
from PIL import ImageDraw

from fmreg.figures.layout import BACKGROUND, category_colour, save_png, text_width, write_text

_PANEL = (560, 170)
_PAD = (60, 26, 14, 30)  # left, top, right, bottom


def _smooth(values: np.ndarray) -> np.ndarray:
    window = max(1, len(values) // 50)
    kernel = np.ones(window) / window
    padded = np.concatenate([np.full(window - 1, values[0]), values])
    return np.convolve(padded, kernel, mode="valid")


def _panel(draw: ImageDraw.ImageDraw, top: int, name: str, steps: np.ndarray, values: np.ndarray, colour) -> None:
    left, pad_top, right, bottom = _PAD
    w, h = _PANEL
    x0, y0, x1, y1 = left, top + pad_top, w - right, top + h - bottom
    finite = values[np.isfinite(values)]
    lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
    hi = hi if hi > lo else lo + 1.0
    draw.rectangle((x0, y0, x1, y1), outline=(90, 90, 90))
    span = max(1.0, float(steps[-1] - steps[0]))

    def xy(s, v):
        return x0 + (s - steps[0]) / span * (x1 - x0), y1 - (v - lo) / (hi - lo) * (y1 - y0)

    faint = tuple(int(0.45 * c + 0.55 * b) for c, b in zip(colour, BACKGROUND))
    for series, fill, width in ((values, faint, 1), (_smooth(values), colour, 2)):
        pts = [xy(s, v) for s, v in zip(steps, series) if np.isfinite(v)]
        if len(pts) > 1:
            draw.line(pts, fill=fill, width=width)
    write_text(draw, (x0, top + 4), f"{name}  (last {values[-1]:.4g})", size=13)
    for v, y in ((hi, y0), (lo, y1)):
        label = f"{v:.3g}"
        write_text(draw, (x0 - 6 - text_width(label, 11), y - 7), label, size=11)
    first, last = f"step {int(steps[0])}", f"step {int(steps[-1])}"
    write_text(draw, (x0, y1 + 6), first, size=11)
    write_text(draw, (x1 - text_width(last, 11), y1 + 6), last, size=11)  # inside the figure


def save_loss_curves(path: str | Path, history: Sequence[dict], title: str = "") -> Path:
    """Draw every numeric term of ``history`` (one record per step, with ``step``) to ``path``.

    Args:
        path: Output PNG.
        history: ``[{"step": 1, "loss": ..., "similarity": ..., ...}, ...]``.
        title: Written above the panels.
    """
    if not history:
        raise ValueError("no loss history to draw")
    names = [k for k in history[0] if k != "step"]
    steps = np.array([r["step"] for r in history], dtype=float)
    head = 28 if title else 0
    fig = PILImage.new("RGB", (_PANEL[0], head + _PANEL[1] * len(names)), BACKGROUND)
    draw = ImageDraw.Draw(fig)
    if title:
        write_text(draw, (10, 6), title, size=15)
    for i, name in enumerate(names):
        values = np.array([float(r.get(name, np.nan)) for r in history])
        _panel(draw, head + i * _PANEL[1], name, steps, values, category_colour(i + 1))
    return save_png(fig, path)
