"""ROI pairs redrawn as one kind of iso-intensity region in both images (fmreg.correspond.levels)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fmreg.correspond.levels import level_region, redraw_pairs
from fmreg.correspond.pairs import RoiPair


def _scene(shift=(0.0, 0.0), shape=(80, 90)):
    """A bright ellipse (centre (40, 45)) on a background ramp, the whole scene moved by
    ``shift`` (rows, cols)."""
    r, c = np.meshgrid(np.arange(shape[0], dtype=float), np.arange(shape[1], dtype=float), indexing="ij")
    inside = ((r - 40 - shift[0]) / 12) ** 2 + ((c - 45 - shift[1]) / 18) ** 2 <= 1
    return 0.2 + 0.002 * (c - shift[1]) + 0.5 * inside, inside


def _iou(a, b) -> float:
    return float((a & b).sum() / (a | b).sum())


def test_the_region_is_the_structure_whatever_the_cut():
    image, truth = _scene()
    # A cut that misses a third of the ellipse and takes in background below it.
    seed = truth.copy()
    seed[:, 50:] = False
    seed[50:56, 30:50] = True
    window = np.zeros_like(truth)
    window[20:62, 20:72] = True
    region = level_region(image, seed, window)
    assert _iou(seed, truth) < 0.75
    assert region is not None and _iou(region, truth) == 1.0


def test_a_region_that_runs_out_of_its_window_is_dropped():
    image, truth = _scene()
    window = np.zeros_like(truth)
    window[30:50, 30:60] = True  # cuts the ellipse: its outline would follow the window
    assert level_region(image, truth, window) is None


def test_no_contrast_with_the_ring_no_region():
    flat = np.full((40, 40), 0.5)
    seed = np.zeros((40, 40), dtype=bool)
    seed[15:25, 15:25] = True
    assert level_region(flat, seed, np.ones_like(seed)) is None


def _pair(fixed_mask, moving_mask, **kw):
    return RoiPair(torch.from_numpy(fixed_mask), torch.from_numpy(moving_mask), 0.9, **kw)


def _translation(rows: float, cols: float) -> np.ndarray:
    """Fixed mm -> moving mm, (x, y) = (column, row), unit spacing."""
    return np.array([[1.0, 0.0, cols], [0.0, 1.0, rows], [0.0, 0.0, 1.0]])


def test_both_masks_are_redrawn_alike_and_differ_only_by_the_move():
    fixed, f_truth = _scene()
    moving, m_truth = _scene(shift=(4.0, -6.0))
    f_cut, m_cut = f_truth.copy(), m_truth.copy()
    # The two segmentations cut the structure differently, by less than the window (3-4 px).
    f_cut[:, :30] = False
    m_cut |= np.roll(m_truth, 2, axis=0)
    assert _iou(np.roll(f_cut, (4, -6), axis=(0, 1)), m_cut) < 0.9
    pairs = [_pair(f_cut, m_cut)]
    out = redraw_pairs(pairs, torch.from_numpy(fixed), torch.from_numpy(moving), _translation(4, -6), (1.0, 1.0), (1.0, 1.0))
    assert len(out) == 1 and out[0].similarity == 0.9
    f, m = out[0].fixed_mask.numpy(), out[0].moving_mask.numpy()
    # Smoothing moves the half level by a pixel here and there against the ramp; alike in both.
    assert _iou(f, f_truth) > 0.97 and _iou(m, m_truth) > 0.97
    assert _iou(np.roll(f, (4, -6), axis=(0, 1)), m) == 1.0


def test_a_pair_that_disagrees_with_the_global_move_is_dropped():
    fixed, f_truth = _scene()
    moving, m_truth = _scene(shift=(4.0, -6.0))
    out = redraw_pairs([_pair(f_truth, m_truth)], torch.from_numpy(fixed), torch.from_numpy(moving),
                       _translation(-10, 12), (1.0, 1.0), (1.0, 1.0))
    assert out == []


def test_slices_of_volumes_are_redrawn_in_place_with_anisotropic_spacing():
    """A 3D pair lifted from fixed slice 2 and moving slice 3 (axis 0); rows at 2 mm."""
    f2d, f_truth = _scene()
    m2d, m_truth = _scene(shift=(2.0, 5.0))
    fixed = torch.zeros(5, 80, 90, dtype=torch.float64)
    moving = torch.zeros(6, 80, 90, dtype=torch.float64)
    fixed[2], moving[3] = torch.from_numpy(f2d), torch.from_numpy(m2d)
    fm = torch.zeros(5, 80, 90, dtype=torch.bool)
    mm = torch.zeros(6, 80, 90, dtype=torch.bool)
    cut = f_truth.copy()
    cut[:31] = False
    fm[2], mm[3] = torch.from_numpy(cut), torch.from_numpy(m_truth)
    matrix = np.array([[1.0, 0.0, 5.0], [0.0, 1.0, 4.0], [0.0, 0.0, 1.0]])  # 2 rows = 4 mm
    out = redraw_pairs([RoiPair(fm, mm, 0.8, 2, 3)], fixed, moving, matrix, (2.0, 1.0), (2.0, 1.0), axis=0)
    assert len(out) == 1
    f, m = out[0].fixed_mask, out[0].moving_mask
    assert f.shape == fm.shape and m.shape == mm.shape
    assert f[2].sum() == f.sum() and m[3].sum() == m.sum()  # in place: nothing on other slices
    assert _iou(f[2].numpy(), f_truth) > 0.95  # smoothed by 2 mm: 2 px along the rows
    assert _iou(np.roll(f[2].numpy(), (2, 5), axis=(0, 1)), m[3].numpy()) > 0.99


def test_without_pairs_and_image_term_the_fit_returns_its_start():
    from fmreg.core.grid import Frame, Grid
    from fmreg.optimize.fit import FitOptions, fit_field

    grid = Grid((20, 24), (2.0, 1.0))
    start = np.array([[1.0, 0.0, 3.0], [0.0, 1.0, -2.0], [0.0, 0.0, 1.0]])  # x + 3 mm, y - 2 mm
    u, report = fit_field(grid, torch.zeros(0, 20, 24), torch.zeros(0, 20, 24), grid, FitOptions(image_weight=0.0),
                          initial_affine=start)
    data = u.to(Frame.PHYSICAL).data
    torch.testing.assert_close(data[0], torch.full((20, 24), 3.0), atol=1e-4, rtol=0)
    torch.testing.assert_close(data[1], torch.full((20, 24), -2.0), atol=1e-4, rtol=0)
    assert report.initial_affine_mm == start.tolist()


@pytest.mark.parametrize("redraw", [True, False])
def test_the_option_reaches_the_roi_stage(redraw):
    from fmreg.methods.base import get_method

    method = get_method("samreg", redraw_masks=redraw)
    assert method.roi_options.redraw_masks is redraw and method.parameters()["roi"]["redraw_masks"] is redraw
