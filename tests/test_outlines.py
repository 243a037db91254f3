"""The consensus refined on region outlines (fmreg.correspond.outlines)."""

from __future__ import annotations

import math

import numpy as np
import torch

from fmreg.correspond.consensus import fit_similarity
from fmreg.correspond.outlines import outline_points, refine_on_outlines
from planar import similarity  # tests/ is on sys.path (rootdir-relative import)

SIDE = 200
#: (centre x, centre y, semi-axis a, semi-axis b, orientation in degrees), mm = pixels.
ELLIPSES = [(50, 50, 22, 12, 10), (140, 45, 15, 15, 0), (60, 140, 18, 9, 70), (145, 140, 25, 14, -30),
            (100, 95, 10, 20, 45)]


def _ellipse(where: np.ndarray, cx, cy, a, b, deg) -> np.ndarray:
    """Inside test of ``(..., 2)`` ``(x, y)`` points."""
    t = math.radians(deg)
    d = where - np.array([cx, cy])
    u = d[..., 0] * math.cos(t) + d[..., 1] * math.sin(t)
    v = -d[..., 0] * math.sin(t) + d[..., 1] * math.cos(t)
    return (u / a) ** 2 + (v / b) ** 2 <= 1.0


def _pixels() -> np.ndarray:
    rows, cols = np.mgrid[0:SIDE, 0:SIDE]
    return np.stack([cols, rows], axis=-1).astype(np.float64)


def _masks(matrix: np.ndarray) -> list[torch.Tensor]:
    """Each ellipse in the image the fixed one is mapped into by ``matrix`` (fixed → moving)."""
    back = np.linalg.inv(matrix)
    pts = _pixels() @ back[:2, :2].T + back[:2, 2]  # moving pixel -> fixed position
    return [torch.from_numpy(_ellipse(pts, *e)) for e in ELLIPSES]


def _error(estimate: np.ndarray, truth: np.ndarray) -> float:
    """Mean distance (mm) between where the two maps take the image's pixels."""
    p = _pixels().reshape(-1, 2)
    return float(np.linalg.norm(p @ (estimate - truth)[:2, :2].T + (estimate - truth)[:2, 2], axis=1).mean())


def test_outline_points_are_the_pixels_touching_the_outside_in_mm_x_y():
    mask = torch.zeros(5, 6, dtype=torch.bool)
    mask[1:4, 2:5] = True  # rows 1-3, columns 2-4: all but the centre (2, 3) touch the outside
    pts = outline_points(mask, spacing_rc=(2.0, 0.5))
    assert len(pts) == 8
    assert {(float(x), float(y)) for x, y in pts} == {
        (c * 0.5, r * 2.0) for r in (1, 2, 3) for c in (2, 3, 4) if (r, c) != (2, 3)}


def test_the_similarity_is_recovered_where_the_segmentations_cut_regions_differently():
    truth = similarity(12.0, 1.06, (9.0, -7.0))
    fixed, moving = _masks(np.eye(3)), _masks(truth)
    # Two moving regions are cut differently: one loses a third of itself, one gains a lobe.
    cols = torch.arange(SIDE).expand(SIDE, SIDE)
    centre_x = int(moving[0].nonzero()[:, 1].float().mean())
    moving[0] = moving[0] & (cols < centre_x + 8)
    lobe = _masks(truth @ similarity(0.0, 1.0, (14.0, 0.0)))[3]
    moving[3] = moving[3] | lobe
    start = truth @ similarity(2.5, 0.98, (2.0, 1.5))
    f_out = [outline_points(m, (1.0, 1.0)) for m in fixed]
    m_out = [outline_points(m, (1.0, 1.0)) for m in moving]
    refined = refine_on_outlines(start, f_out, m_out, floor_mm=1.0)
    centroid = lambda m: m.nonzero().double().mean(0).flip(0).numpy()  # noqa: E731 (x, y)
    moments = fit_similarity(np.array([centroid(m) for m in fixed]), np.array([centroid(m) for m in moving]),
                             np.ones(len(fixed)))
    assert _error(start, truth) > 3.0
    assert _error(moments, truth) > 1.5  # the cuts move the centroids
    assert _error(refined, truth) < 0.5, _error(refined, truth)  # measured: 0.11 mm
    # Without the trim the parts the cuts made pull it off (measured: 2.8 mm).
    assert _error(refine_on_outlines(start, f_out, m_out, floor_mm=1.0, trim=math.inf), truth) > 1.5


def test_with_fewer_than_two_outlines_the_start_is_kept():
    start = similarity(3.0, 1.0, (1.0, 2.0))
    one = [np.array([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])]
    np.testing.assert_array_equal(refine_on_outlines(start, one, one, floor_mm=1.0), start)
    np.testing.assert_array_equal(refine_on_outlines(start, one * 2, [one[0], one[0][:2]], floor_mm=1.0), start)
