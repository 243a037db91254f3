"""Analytic checks of the SAMReg dense fit (fmreg.optimize.fit, paper 002 Eq. 10).

Convention (fmreg.transforms.displacement): ``T(x) = x + u(x)`` maps fixed physical points to moving ones, so
a structure that sits ``d`` mm further along x in the moving image gives ``u ≈ +d`` there.

ROI-only fits here use ``reg_weight=0.5, lr=0.5``: a disk's interior carries no information
(only its boundary does), and with the default, weaker regulariser the interior of a
translated ROI is left compressed or stretched, so the displacement at its centre is not
the translation (measured: 2.54, 1.66 mm for a 3, 2 mm shift on a 1 mm grid). With the
stronger regulariser the smoothest map that matches the boundary, a translation, wins.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch.testing import assert_close

from fmreg.errors import FmregError
from fmreg.transforms.displacement import DisplacementField, jacobian_determinant
from fmreg.core.sampling import sample
from fmreg.transforms.warp import warp
from fmreg.core.grid import Frame, Grid
from fmreg.core.image import Image
from fmreg.optimize.fit import FitOptions, fit_field
from fmreg.optimize.pyramid import level_grids

ROI_ONLY = dict(image_weight=0.0, verify_dice=None, reg_weight=0.5, lr=0.5)


# Tiny problems: thread start-up and contention cost more than the work (measured 0.15 s
# on one thread vs 0.6-8 s on two for one fit); the fixture lives in conftest.py.
pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ---------------------------------------------------------------------------- helpers
def _ellipsoid(grid: Grid, centre, semi) -> torch.Tensor:
    """Bool mask of ``sum(((x - c) / s)^2) <= 1`` in world mm (components x, y[, z])."""
    x = grid.coordinates(Frame.PHYSICAL, dtype=torch.float64)
    r2 = sum(((x[i] - centre[i]) / semi[i]) ** 2 for i in range(grid.ndim))
    return r2 <= 1.0


def _blob(grid: Grid, centre, sigma: float) -> torch.Tensor:
    x = grid.coordinates(Frame.PHYSICAL, dtype=torch.float64)
    r2 = sum((x[i] - centre[i]) ** 2 for i in range(grid.ndim))
    return torch.exp(-r2 / (2 * sigma**2)).float()


def _u_at(u: DisplacementField, point) -> torch.Tensor:
    """Physical displacement (x, y[, z]) at a world point, linearly interpolated."""
    grid = u.grid
    pts = torch.tensor(point, dtype=torch.float32).reshape(grid.ndim, *[1] * grid.ndim)
    return sample(u.to(Frame.PHYSICAL).data, grid, pts).flatten()


def _dice(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a > 0.5, b > 0.5
    return float(2 * (a & b).sum() / (a.sum() + b.sum()))


def _empty(grid: Grid) -> torch.Tensor:
    return torch.zeros((0, *grid.shape))


def _assert_no_folding(u: DisplacementField) -> None:
    jac = jacobian_determinant(u)
    assert float(jac.min()) > 0, f"folding: min Jacobian determinant {float(jac.min()):.3f}"


# ---------------------------------------------------------------------------- building blocks
def test_level_grids_keep_the_slices_and_the_field_of_view_of_a_cardiac_stack():
    # ACDC-like: 7 slices of 208 x 256 at 1.5625 x 1.5625 x 10 mm.
    grid = Grid((7, 208, 256), (1.5625, 1.5625, 10.0), (-120.0, 35.5, 12.0))
    levels = level_grids(grid, 4)
    assert [g.shape for g in levels] == [(7, 26, 32), (7, 52, 64), (7, 104, 128), (7, 208, 256)]
    assert levels[-1] == grid
    fov = [sp * (n - 1) for sp, n in zip(grid.spacing, grid.size)]
    for g in levels:
        assert g.origin == grid.origin and g.direction == grid.direction
        assert [sp * (n - 1) for sp, n in zip(g.spacing, g.size)] == pytest.approx(fov)
        assert g.spacing[2] == 10.0
    assert level_grids(grid, 1) == [grid]


def test_level_grids_never_shrink_a_coarse_axis_even_when_it_is_long():
    grid = Grid((40, 64), (1.0, 3.0))  # y (array axis 0) is 3x coarser than x
    shapes = [g.shape for g in level_grids(grid, 3)]
    assert shapes == [(40, 16), (40, 32), (40, 64)]


# ---------------------------------------------------------------------------- ROI-only fits
@pytest.mark.parametrize(
    "grid,centre,shift",
    [
        (Grid((64, 64), (1.0, 1.0)), (32.0, 32.0), (3.0, 2.0)),
        # Anisotropic with an origin; the shifts are whole voxels (4 and 2), so the moving
        # disk is an exact translate of the fixed one.
        (Grid((48, 80), (0.75, 1.25), (5.0, -10.0)), (35.0, 20.0), (3.0, 2.5)),
    ],
    ids=["iso-1mm", "aniso-0.75x1.25"],
)
def test_roi_pairs_alone_recover_the_translation_of_a_disk(grid, centre, shift):
    fixed = _ellipsoid(grid, centre, (10.0, 10.0))
    moving = _ellipsoid(grid, [c + s for c, s in zip(centre, shift)], (10.0, 10.0))
    u, report = fit_field(grid, fixed[None], moving[None], grid, FitOptions(**ROI_ONLY))
    assert u.grid == grid and u.frame == Frame.PHYSICAL
    assert_close(_u_at(u, centre), torch.tensor(shift), atol=0.5, rtol=0)
    warped = warp(Image(moving.float(), grid), u).data
    assert _dice(warped, fixed) > 0.9
    assert _dice(moving.float(), fixed) < 0.8  # the test is not trivial
    _assert_no_folding(u)
    assert report.kept_pairs is None  # no verification stage


def test_the_centroid_term_alone_recovers_the_translation_of_a_disk():
    # No overlap terms, no image: only T(fixed centroid) → moving centroid pulls, in mm.
    grid = Grid((48, 80), (0.75, 1.25), (5.0, -10.0))
    centre, shift = (35.0, 20.0), (3.0, 2.5)
    fixed = _ellipsoid(grid, centre, (10.0, 10.0))
    moving = _ellipsoid(grid, [c + s for c, s in zip(centre, shift)], (10.0, 10.0))
    opt = FitOptions(**{**ROI_ONLY, "mse_weight": 0.0, "dice_weight": 0.0, "centroid_weight": 1.0})
    u, report = fit_field(grid, fixed[None], moving[None], grid, opt)
    assert_close(_u_at(u, centre), torch.tensor(shift), atol=0.3, rtol=0)
    assert report.levels[-1]["centroid_mm2"] < 0.1  # squared mm, weighted


def test_roi_pairs_alone_recover_the_translation_of_an_ellipsoid_in_3d():
    grid = Grid((8, 32, 32), (1.5, 1.5, 5.0), (2.0, 3.0, -7.0))
    centre, semi, shift = (26.0, 27.0, 17.0), (12.0, 10.0, 12.0), (3.0, -3.0, 0.0)  # 2 voxels in x, y
    fixed = _ellipsoid(grid, centre, semi)
    moving = _ellipsoid(grid, [c + s for c, s in zip(centre, shift)], semi)
    opt = FitOptions(**ROI_ONLY, levels=2, iterations=(40, 20))
    u, _ = fit_field(grid, fixed[None], moving[None], grid, opt)
    assert u.data.shape == (3, 8, 32, 32)
    assert_close(_u_at(u, centre), torch.tensor(shift), atol=0.5, rtol=0)
    assert _dice(warp(Image(moving.float(), grid), u).data, fixed) > 0.9
    _assert_no_folding(u)


@pytest.mark.parametrize(
    "moving_grid",
    [
        Grid((70, 60), (0.9, 1.1), (-3.0, -14.0)),
        # Rotated by 90°: index x runs along world y, index y along world -x.
        Grid((70, 70), (1.0, 1.0), (70.0, -15.0), (0.0, -1.0, 1.0, 0.0)),
    ],
    ids=["other-origin-spacing", "rotated-direction"],
)
def test_moving_masks_on_their_own_grid_are_used_in_world_coordinates(moving_grid):
    grid = Grid((48, 80), (0.75, 1.25), (5.0, -10.0))
    centre, shift = (35.0, 20.0), (3.0, 2.5)
    fixed = _ellipsoid(grid, centre, (10.0, 10.0))
    moving = _ellipsoid(moving_grid, [c + s for c, s in zip(centre, shift)], (10.0, 10.0))
    u, _ = fit_field(grid, fixed[None], moving[None], moving_grid, FitOptions(**ROI_ONLY))
    assert u.grid == grid
    assert_close(_u_at(u, centre), torch.tensor(shift), atol=0.5, rtol=0)
    assert _dice(warp(Image(moving.float(), moving_grid), u).data, fixed) > 0.9
    _assert_no_folding(u)


def test_opposite_motions_of_two_rois_do_not_fold_the_field():
    # Two disks 26 mm apart moving 4 mm towards each other: the strongest compression the
    # field has to take; default options (weak regulariser), ROI terms only.
    grid = Grid((64, 64), (1.0, 1.0))
    a, b = (19.0, 32.0), (45.0, 32.0)
    fixed = torch.stack([_ellipsoid(grid, a, (8.0, 8.0)), _ellipsoid(grid, b, (8.0, 8.0))])
    moving = torch.stack([_ellipsoid(grid, (a[0] + 4, a[1]), (8.0, 8.0)), _ellipsoid(grid, (b[0] - 4, b[1]), (8.0, 8.0))])
    u, _ = fit_field(grid, fixed, moving, grid, FitOptions(image_weight=0.0, verify_dice=None))
    _assert_no_folding(u)
    assert float(_u_at(u, a)[0]) > 2.0 and float(_u_at(u, b)[0]) < -2.0


# ---------------------------------------------------------------------------- hybrid (images)
@pytest.mark.parametrize("metric", ["lncc", "mse"])
def test_the_image_term_alone_recovers_the_translation_of_a_smooth_blob(metric):
    grid = Grid((64, 64), (1.0, 1.0))
    centre, shift = (32.0, 32.0), (3.0, 2.5)
    fixed = _blob(grid, centre, 6.0)
    moving = 0.8 * _blob(grid, [c + s for c, s in zip(centre, shift)], 6.0) + 0.1  # gain + offset
    u, report = fit_field(grid, _empty(grid), _empty(grid), grid, FitOptions(image_metric=metric), fixed, moving)
    assert_close(_u_at(u, centre), torch.tensor(shift), atol=0.5, rtol=0)
    _assert_no_folding(u)
    assert report.kept_pairs is None  # nothing to verify
    assert report.levels and all("dice" not in lv for lv in report.levels)  # no ROI term ran


def test_histogram_matching_gives_the_moving_image_the_fixed_quantiles():
    from fmreg.core.intensity import match_histogram

    g = torch.Generator().manual_seed(0)
    fixed = torch.rand(32, 32, generator=g)
    moving = torch.rand(32, 32, generator=g) ** 3  # a monotone, non-linear intensity change
    matched = match_histogram(moving, fixed)
    # Same ranks as the moving image, same values as the fixed one.
    assert torch.equal(torch.argsort(matched.flatten()), torch.argsort(moving.flatten()))
    assert_close(torch.sort(matched.flatten()).values, torch.sort(fixed.flatten()).values, atol=1e-6, rtol=0)
    grid = Grid((64, 64), (1.0, 1.0))
    centre, shift = (32.0, 32.0), (3.0, 2.5)
    opt = FitOptions(image_metric="mse", match_histogram=True)
    blob_m = _blob(grid, [c + s for c, s in zip(centre, shift)], 6.0) ** 3
    u, _ = fit_field(grid, _empty(grid), _empty(grid), grid, opt, _blob(grid, centre, 6.0), blob_m)
    assert_close(_u_at(u, centre), torch.tensor(shift), atol=0.5, rtol=0)


# ---------------------------------------------------------------------------- slice-wise ROIs (3D)
def _disk_on_slice(grid: Grid, index: int, centre, radius: float) -> torch.Tensor:
    disk = _ellipsoid(grid, (centre[0], centre[1], 0.0), (radius, radius, 1e6))
    out = torch.zeros_like(disk)
    out[index] = disk[index]
    return out


STACK = Grid((7, 32, 32), (1.5, 1.5, 6.0), (-4.0, 2.0, 30.0))
ROI_CENTRE = (20.0, 24.5)  # mm, in-plane; slice 3 lies at z = 30 + 3 * 6 = 48 mm
SLICE_SHIFT = (3.0, -3.0)


def test_slice_axis_recovers_the_in_plane_shift_wherever_the_moving_roi_lies():
    fixed = _disk_on_slice(STACK, 3, ROI_CENTRE, 9.0)
    target = (ROI_CENTRE[0] + SLICE_SHIFT[0], ROI_CENTRE[1] + SLICE_SHIFT[1])
    fields = {}
    for moving_slice in (3, 4):
        moving = _disk_on_slice(STACK, moving_slice, target, 9.0)
        u, _ = fit_field(STACK, fixed[None], moving[None], STACK, FitOptions(**ROI_ONLY), slice_axis=0)
        assert_close(_u_at(u, (*ROI_CENTRE, 48.0))[:2], torch.tensor(SLICE_SHIFT), atol=0.5, rtol=0)
        _assert_no_folding(u)
        fields[moving_slice] = u.data
    # The moving mask is extruded along the slice axis, so which moving slice the ROI came
    # from cannot matter.
    assert_close(fields[3], fields[4])


def test_slice_axis_adds_no_through_plane_displacement_with_default_options():
    fixed = _disk_on_slice(STACK, 3, ROI_CENTRE, 9.0)
    moving = _disk_on_slice(STACK, 3, (ROI_CENTRE[0] + SLICE_SHIFT[0], ROI_CENTRE[1] + SLICE_SHIFT[1]), 9.0)
    u, _ = fit_field(STACK, fixed[None], moving[None], STACK, FitOptions(image_weight=0.0, verify_dice=None), slice_axis=0)
    uz_in_roi = u.data[2][fixed]
    assert float(uz_in_roi.abs().max()) < 0.5


# ---------------------------------------------------------------------------- verification
def _two_disks():
    grid = Grid((64, 64), (1.0, 1.0))
    a, b, shift = (20.0, 32.0), (46.0, 32.0), (2.0, 1.0)
    fa, fb = _ellipsoid(grid, a, (8.0, 8.0)), _ellipsoid(grid, b, (8.0, 8.0))
    ma = _ellipsoid(grid, (a[0] + shift[0], a[1] + shift[1]), (8.0, 8.0))
    mb = _ellipsoid(grid, (b[0] + shift[0], b[1] + shift[1]), (8.0, 8.0))
    fixed_img = fa.float() + 0.6 * fb.float()
    moving_img = ma.float() + 0.6 * mb.float()
    return grid, (fa, fb, ma, mb), fixed_img, moving_img, a, shift


@pytest.mark.parametrize("metric", ["lncc", "mse"])
def test_verification_drops_a_pair_that_the_images_contradict(metric):
    grid, (fa, fb, ma, mb), fixed_img, moving_img, a, shift = _two_disks()
    # Pair 1 matches disk A with disk B, 26 mm away: a wrong match.
    fixed_masks = torch.stack([fa, fa, fb])
    moving_masks = torch.stack([ma, mb, mb])
    opt = FitOptions(image_metric=metric, verify_dice=0.7, refine_iterations=30)
    u, report = fit_field(grid, fixed_masks, moving_masks, grid, opt, fixed_img, moving_img)
    assert report.kept_pairs == [0, 2]
    assert_close(_u_at(u, a), torch.tensor(shift), atol=1.0, rtol=0)
    _assert_no_folding(u)
    # The images alone first, then a refinement of the finest level with the kept pairs:
    # only that last stage reports ROI terms.
    assert report.levels[-1]["shape"] == [64, 64]
    assert report.levels[-1]["iterations"] == opt.refine_iterations
    assert "dice" in report.levels[-1] and report.levels[-1]["dice"] > 0.9
    assert all("dice" not in lv for lv in report.levels[:-1])


@pytest.mark.parametrize("grid", [Grid((48, 56), (1.0, 1.2), (3.0, -4.0)), Grid((40, 80), (2.0, 1.0)),
                                  Grid((12, 40, 36), (1.5, 1.5, 10.0))])
def test_identical_roi_pairs_give_the_identity(grid):
    # Every stage keeps its best iterate: with nothing to correct that is the start, although
    # Adam's first steps move every control point by about lr (1 mm) and Dice's one-sided
    # derivative at the identity is not zero.
    centres = [(30.0, 20.0), (45.0, 30.0)] if grid.ndim == 2 else [(25.0, 30.0, 60.0), (35.0, 40.0, 60.0)]
    radii = [(10.0, 8.0), (6.0, 9.0)] if grid.ndim == 2 else [(10.0, 8.0, 25.0), (6.0, 9.0, 25.0)]
    masks = torch.stack([_ellipsoid(grid, c, r) for c, r in zip(centres, radii)])
    assert masks.flatten(1).sum(1).min() > 50
    u, report = fit_field(grid, masks, masks.clone(), grid, FitOptions(image_weight=0.0, verify_dice=None))
    assert float(u.data.abs().max()) == 0.0
    assert all(level["best_iteration"] == 0 for level in report.levels)


# ---------------------------------------------------------------------------- errors and edge cases
def test_input_errors_are_user_errors():
    grid = Grid((20, 20), (1.0, 1.0))
    m = _ellipsoid(grid, (10.0, 10.0), (4.0, 4.0))
    with pytest.raises(FmregError, match="2 fixed ROI masks but 1 moving"):
        fit_field(grid, torch.stack([m, m]), m[None], grid, FitOptions(image_weight=0.0))
    with pytest.raises(FmregError, match="iterations has 2 values for 3 levels"):
        fit_field(grid, m[None], m[None], grid, FitOptions(levels=3, iterations=(5, 5), image_weight=0.0))
    with pytest.raises(FmregError, match="unknown image_metric 'ssd'"):
        fit_field(grid, m[None], m[None], grid, FitOptions(image_metric="ssd"))


def test_no_pairs_and_no_image_term_gives_the_identity():
    grid = Grid((20, 24), (1.0, 2.0))
    u, report = fit_field(grid, _empty(grid), _empty(grid), grid, FitOptions())
    assert u.grid == grid
    assert float(u.data.abs().max()) == 0.0
    assert report.levels == [] and report.kept_pairs is None


def test_fit_options_to_dict_is_json_ready():
    import json

    d = FitOptions(iterations=(3, 2, 1), levels=3).to_dict()
    assert d["iterations"] == [3, 2, 1]
    assert json.loads(json.dumps(d)) == d
    assert FitOptions(iterations=7).to_dict()["iterations"] == 7


def test_antialiasing_gives_the_level_sigma_and_leaves_uncoarsened_axes_alone():
    from fmreg.optimize.pyramid import antialias

    # 3D, slices 8 mm apart and 1 mm in-plane; the level halves the in-plane resolution only.
    grid = Grid((5, 41, 41), (1.0, 1.0, 8.0))
    level = grid.resized((5, 21, 21))
    impulse = torch.zeros(grid.shape)
    impulse[2, 20, 20] = 1.0
    out = antialias(impulse, grid, level, sigma=1.0)
    assert_close(out.sum(), torch.tensor(1.0), atol=1e-5, rtol=0)
    assert_close(out[[1, 3]].abs().sum(), torch.tensor(0.0))  # nothing leaks between slices
    d = torch.arange(41, dtype=torch.float32) - 20
    plane = out[2]
    var_rows = float((plane.sum(1) * d * d).sum())
    var_cols = float((plane.sum(0) * d * d).sum())
    # sigma · sqrt(f² − 1) voxels with f = 2: a variance of 3 voxels².
    assert_close(torch.tensor([var_rows, var_cols]), torch.tensor([3.0, 3.0]), atol=0.05, rtol=0)
    assert torch.equal(antialias(impulse, grid, grid, sigma=1.0), impulse)


def test_adam_takes_the_same_steps_as_torch_optim_adam():
    from fmreg.optimize.adam import Adam

    g = torch.Generator().manual_seed(1)
    target = torch.randn(4, 5, generator=g)
    ours, theirs = torch.zeros(4, 5, requires_grad=True), torch.zeros(4, 5, requires_grad=True)
    opt_ours, opt_theirs = Adam([ours], lr=0.1), torch.optim.Adam([theirs], lr=0.1)
    for _ in range(25):
        for p, o in ((ours, opt_ours), (theirs, opt_theirs)):
            o.zero_grad()
            ((p - target) ** 4).sum().backward()
            o.step()
    assert_close(ours.detach(), theirs.detach())


# ---------------------------------------------------------------------------- fine settings gate
def _fine_pair(grid: Grid, inverted: bool):
    centre, shift = (32.0, 32.0), (1.0, 0.5)
    fixed = _blob(grid, centre, 8.0)
    moving = _blob(grid, [c + s for c, s in zip(centre, shift)], 8.0)
    return fixed, (1 - moving if inverted else moving)


FAST = dict(levels=2, iterations=(5, 5), refine_iterations=0)


@pytest.mark.parametrize(
    "inverted, fine_control_spacing, spacing, expected_control",
    [
        (False, 2.0, 1.0, 33),  # images agree: ceil(63 mm / 2 mm) + 1 control points per axis
        (True, 2.0, 1.0, 10),  # inverted contrast disagrees: the coarse 7 mm grid stays
        (False, 0.1, 1.5, 33),  # never finer than two voxels: 94.5 mm / 3 mm
    ],
)
def test_fine_settings_apply_on_the_finest_level_only_when_the_images_agree(
    inverted, fine_control_spacing, spacing, expected_control
):
    grid = Grid((64, 64), (spacing, spacing))
    fixed, moving = _fine_pair(grid, inverted)
    opt = FitOptions(**FAST, fine_control_spacing=fine_control_spacing)
    _, report = fit_field(grid, _empty(grid), _empty(grid), grid, opt, fixed, moving)
    assert (report.fine_correlation >= opt.fine_min_correlation) is (not inverted)
    assert report.fine_correlation < 0 if inverted else report.fine_correlation > 0.96
    coarse, fine = report.levels
    assert coarse["control_shape"] == ([10, 10] if spacing == 1.0 else [15, 15])  # 7 mm on the coarse level
    assert fine["control_shape"] == [expected_control] * 2


def test_fine_settings_need_the_image_term_and_apply_always_without_a_threshold():
    grid = Grid((64, 64), (1.0, 1.0))
    fixed, moving = _fine_pair(grid, inverted=True)
    _, report = fit_field(grid, _empty(grid), _empty(grid), grid,
                          FitOptions(**FAST, fine_min_correlation=None), fixed, moving)
    assert report.fine_correlation is None and report.levels[-1]["control_shape"] == [33, 33]
    masks = _ellipsoid(grid, (32.0, 32.0), (10.0, 10.0))[None]
    _, report = fit_field(grid, masks, masks, grid, FitOptions(**FAST, **ROI_ONLY))
    assert report.fine_correlation is None and report.levels[-1]["control_shape"] == [10, 10]


def _framed_texture(grid: Grid, seed: int, u: torch.Tensor | None = None) -> torch.Tensor:
    """Smooth texture in [0.2, 0.8] with a bright disk, inside a black frame of 10 voxels, seen
    at ``x + u(x)`` (``u``: ``(2, *shape)`` mm; None: at ``x``).

    The texture is interpolated; the frame and the disk are drawn at the mapped points, so their
    edges stay sharp in both images of a pair. The values above the black frame (texture and
    disk) then have nearly the same percentiles in both images, so the fit's intensity windows
    map them alike and the true field has nearly zero image loss.
    """
    from scipy.ndimage import gaussian_filter

    n = grid.shape[0]
    t = torch.from_numpy(gaussian_filter(torch.rand(grid.shape, generator=torch.Generator().manual_seed(seed)).numpy(), 2.0))
    t = 0.2 + 0.6 * (t - t.min()) / (t.max() - t.min())
    x = grid.coordinates(Frame.PHYSICAL)
    if u is not None:
        x = x + u
        t = sample(t[None].float(), grid, x, fill=None)[0]
    c = (n - 1) / 2
    t = torch.where((x[0] - c) ** 2 + (x[1] - c) ** 2 <= 64, torch.ones_like(t), t)
    inside = (x[0] >= 10) & (x[0] <= n - 11) & (x[1] >= 10) & (x[1] <= n - 11)
    return torch.where(inside, t, torch.zeros_like(t)).float()


def test_fine_settings_follow_a_shear_of_10_mm_wavelength_that_the_7_mm_grid_smooths_away():
    grid = Grid((96, 96), (1.0, 1.0))
    moving = _framed_texture(grid, seed=0)
    x = grid.coordinates(Frame.PHYSICAL)
    u_true = torch.stack([torch.sin(2 * math.pi * x[1] / 10.0), torch.zeros_like(x[0])])  # 1 mm amplitude
    fixed = _framed_texture(grid, seed=0, u=u_true)  # fixed(x) = moving(x + u(x))
    errors = {}
    for threshold in (None, 1.01):  # fine settings forced on / off
        opt = FitOptions(initialize="identity", fine_min_correlation=threshold)
        u, _ = fit_field(grid, _empty(grid), _empty(grid), grid, opt, fixed, moving)
        err = (u.data - u_true).pow(2).sum(0).sqrt()[16:-16, 16:-16]  # mm, away from the frame
        errors[threshold] = float(err.median())
        _assert_no_folding(u)
    # Measured: 0.49 mm (2 mm grid) vs 0.68 mm (7 mm grid) for a 0.71 mm RMS field.
    assert errors[None] < 0.62 < errors[1.01], errors


def test_the_fit_recovers_the_shift_of_a_framed_texture_within_0_15_mm():
    grid = Grid((96, 96), (1.0, 1.0))
    moving = _framed_texture(grid, seed=0)
    x = grid.coordinates(Frame.PHYSICAL)
    fixed = sample(moving[None], grid, x + torch.tensor([1.5, 0.0]).reshape(2, 1, 1))[0]
    u, report = fit_field(grid, _empty(grid), _empty(grid), grid, FitOptions(initialize="identity"), fixed, moving)
    assert report.fine_correlation > 0.99  # same texture: the fine settings are on
    assert_close(u.data[:, 16:-16, 16:-16].flatten(1).median(dim=1).values, torch.tensor([1.5, 0.0]), atol=0.15, rtol=0)


@pytest.mark.parametrize("axis", [0, 1])
def test_slice_roi_terms_on_their_own_slices_equal_the_masked_volumes(axis):
    """3D slice pairs: warping each ROI only on its fixed slice gives the same ROI loss as
    warping whole volumes and masking them to that slice."""
    from dataclasses import replace

    from fmreg.core.sampling import identity_points
    from fmreg.losses import roi_pair_loss
    from fmreg.optimize.pyramid import Level, resample_masks
    from fmreg.optimize.stages import Fitter

    grid = Grid((6, 20, 24), (1.5, 1.5, 8.0)) if axis == 0 else Grid((20, 6, 24), (1.5, 8.0, 1.5))
    gen = torch.Generator().manual_seed(0)
    k = 4
    fixed = torch.zeros(k, *grid.shape, dtype=torch.bool)
    for i in range(k):
        sl = [slice(None)] * 3
        sl[axis] = i + 1
        fixed[i][tuple(sl)] = torch.rand(*[n for d, n in enumerate(grid.shape) if d != axis], generator=gen) > 0.6
    moving = torch.rand(k, *grid.shape, generator=gen) > 0.5
    level = Level(grid)
    resample_masks(level, fixed, moving, grid, axis)
    assert level.pair_slices is not None and level.pair_slices.tolist() == [1, 2, 3, 4]
    points = identity_points(grid.shape) + 0.05 * torch.randn(1, *grid.shape, 3, generator=gen)  # (1, *shape, 3)
    weights = torch.full((k,), 1 / k)
    sliced = roi_pair_loss(*Fitter._warped_rois(level, points), weights, 0.3, 0.7)
    whole = roi_pair_loss(*Fitter._warped_rois(replace(level, pair_slices=None), points), weights, 0.3, 0.7)
    assert_close(sliced.total, whole.total, rtol=1e-5, atol=1e-7)
    assert_close(sliced.terms["dice"], whole.terms["dice"], rtol=1e-5, atol=1e-7)


def test_choose_start_takes_the_candidate_only_when_the_images_agree_clearly_better():
    from fmreg.optimize.fit import START_MARGIN, choose_start

    grid = Grid((64, 64), (1.0, 1.0))
    y, x = torch.meshgrid(torch.arange(64.0), torch.arange(64.0), indexing="ij")
    fixed = Image(torch.sin(x / 4) * torch.cos(y / 5) + 0.02 * x, grid)
    shifted = Image(torch.sin((x + 9) / 4) * torch.cos((y - 6) / 5) + 0.02 * (x + 9), grid)  # moving(p) = fixed(p - s)
    right = np.eye(3)
    right[:2, 2] = [-9.0, 6.0]  # T(p) = p - s: maps the fixed point to its moving position
    choice = choose_start(fixed, shifted, right, FitOptions(initialize="identity"))
    assert choice.name == "candidate" and np.allclose(choice.affine, right)
    assert choice.terms["candidate"] * START_MARGIN < choice.terms["usual"]
    wrong = np.eye(3)
    wrong[:2, 2] = [9.0, -6.0]
    choice = choose_start(fixed, shifted, wrong, FitOptions(initialize="identity"))
    assert choice.name == "usual" and choice.affine is None


def test_the_image_term_continues_the_moving_border_beyond_its_field_of_view():
    """A fixed field of view that reaches 9 px past the moving one's right edge, over a source
    that is constant there: under the true translation the image term is exactly 0 (zeros
    beyond the edge would count those 9 columns as a mismatch)."""
    from fmreg.optimize.fit import FitReport, finest_level
    from fmreg.optimize.stages import Fitter

    grid = Grid((40, 64), (1.0, 1.0))
    y, x = torch.meshgrid(torch.arange(40.0), torch.arange(64.0), indexing="ij")

    def source(xx: torch.Tensor) -> torch.Tensor:  # constant in x from column 50 on, values in [0.1, 0.9]
        return 0.5 + 0.4 * torch.sin(xx.clamp(max=50.0) / 4) * torch.cos(y / 5)

    fitter = Fitter(FitOptions(), grid, grid, FitReport(), slice_axis=None, use_image=True)
    fitter.set_images(source(x + 9), source(x))  # fixed(p) = moving(p + (9, 0))
    right = np.eye(3)
    right[0, 2] = 9.0
    level = finest_level(FitOptions(), fitter.grids)
    true_term, identity_term = fitter.start_terms([right, np.eye(3)], level)
    assert true_term == pytest.approx(0.0, abs=1e-10)
    assert identity_term > 1e-3


def _texture(shape: tuple[int, int], seed: int, sigma: float = 2.0) -> torch.Tensor:
    """Smooth random texture in [0.2, 0.8] (Gaussian-filtered noise, ``sigma`` px)."""
    from scipy.ndimage import gaussian_filter

    t = torch.from_numpy(gaussian_filter(torch.rand(shape, generator=torch.Generator().manual_seed(seed)).numpy(), sigma))
    return (0.2 + 0.6 * (t - t.min()) / (t.max() - t.min())).float()


def test_fixed_anatomy_beyond_the_moving_view_does_not_bend_the_fit():
    """The fixed view reaches 14 px past the moving one, over texture the moving image never
    showed. From the true translation, the fit keeps it everywhere: those columns are out of
    the image term (measured: 0.4 mm at most; continuing the moving border there bent the field
    by 4 mm, 4-9 mm over three textures)."""
    source = _texture((96, 128), seed=3)
    grid = Grid((96, 96), (1.0, 1.0))
    moving, fixed = source[:, :96], source[:, 14:110]  # fixed(p) = moving(p + (14, 0))
    start = np.eye(3)
    start[0, 2] = 14.0
    opt = FitOptions(initialize="identity")
    u, _ = fit_field(grid, _empty(grid), _empty(grid), grid, opt, fixed, moving, initial_affine=start)
    err = (u.data - torch.tensor([14.0, 0.0]).reshape(2, 1, 1)).pow(2).sum(0).sqrt()
    assert float(err.max()) < 1.0, float(err.max())


def test_the_overlap_weight_is_where_the_start_maps_into_the_moving_view():
    from fmreg.optimize.fit import FitReport
    from fmreg.optimize.stages import Fitter

    grid = Grid((20, 30), (1.0, 1.0))
    fitter = Fitter(FitOptions(), grid, grid, FitReport(), slice_axis=None, use_image=True)
    assert fitter._overlap(grid) is None  # identity start, same grid: every voxel
    start = np.eye(3)
    start[0, 2] = 5.0  # x + 5 mm: the last 5 columns land beyond the moving view (half a voxel kept)
    fitter.start_from_affine(start)
    weight = fitter._overlap(grid)
    assert_close(weight[:, :25], torch.ones(20, 25))
    assert_close(weight[:, 25:], torch.zeros(20, 5))


def test_the_fine_detail_decision_reads_the_images_as_they_are():
    """The correlation deciding the fine settings is that of the images as read, whatever their
    intensity windows: one bright outlier clipped by a window would change it."""
    from fmreg.losses import correlation

    grid = Grid((48, 48), (1.0, 1.0))
    fixed, moving = _texture((48, 48), seed=1), _texture((48, 48), seed=1).roll(1, dims=1)
    moving[5, 5] = 40.0  # far above the 99th percentile
    opt = FitOptions(levels=1, iterations=2, initialize="identity", refine_iterations=0)
    _, report = fit_field(grid, _empty(grid), _empty(grid), grid, opt, fixed, moving)
    assert report.fine_correlation == pytest.approx(correlation(fixed, moving), abs=1e-4)


def _rotated_pair(degrees: float) -> tuple[Image, Image, np.ndarray]:
    """A smooth texture and the same texture rotated about the image centre; the true fixed →
    moving map (rotation by ``degrees``, physical mm)."""
    grid = Grid((192, 192), (1.0, 1.0))
    source = Image(_texture((192, 192), seed=7), grid)
    t = np.deg2rad(degrees)
    truth = np.eye(3)
    truth[:2, :2] = [[np.cos(t), -np.sin(t)], [np.sin(t), np.cos(t)]]
    truth[:2, 2] = [95.5, 95.5] - truth[:2, :2] @ [95.5, 95.5]
    x = grid.coordinates(Frame.PHYSICAL).double()
    mapped = torch.einsum("ij,j...->i...", torch.from_numpy(truth[:2, :2]), x) + torch.from_numpy(truth[:2, 2]).reshape(2, 1, 1)
    fixed = Image(sample(source.data[None], grid, mapped.float(), fill=None)[0], grid)  # fixed(p) = moving(T p)
    return fixed, source, truth


def test_refine_start_recovers_a_rotation_that_neither_start_has():
    from fmreg.optimize.fit import StartChoice, refine_start

    fixed, moving, truth = _rotated_pair(8.0)
    choice = refine_start(fixed, moving, StartChoice("usual", None, {}), FitOptions(initialize="identity"))
    assert choice.terms["refined_taken"] and choice.name == "usual"
    angle = np.rad2deg(np.arctan2(choice.affine[1, 0], choice.affine[0, 0]))
    assert abs(angle - 8.0) < 0.5, angle
    corners = np.array([[0.0, 0.0, 1.0], [191.0, 0.0, 1.0], [0.0, 191.0, 1.0], [191.0, 191.0, 1.0]]).T
    # Estimated on the coarsest level (8 mm voxels): within half a voxel at the corners (measured 1.9 mm);
    # the deformable fit takes it from there.
    assert np.abs((choice.affine - truth) @ corners).max() < 4.0


def test_refine_start_keeps_a_start_that_needs_no_global_change():
    from fmreg.optimize.fit import StartChoice, refine_start

    fixed, moving, _ = _rotated_pair(0.0)
    choice = refine_start(fixed, moving, StartChoice("usual", None, {"usual": 0.0}), FitOptions(initialize="identity"))
    assert not choice.terms["refined_taken"] and choice.affine is None and choice.terms["usual"] == 0.0


def test_the_mind_image_term_registers_an_inverted_contrast():
    """The moving image is the fixed one with its contrast inverted, shifted by (2, -1) mm: MSE
    of MIND-SSC descriptors (structure, not intensity) recovers the shift; MSE of intensities
    pulls the wrong way (measured: 0.13 mm against 19 mm)."""
    grid = Grid((96, 96), (1.0, 1.0))
    texture = _texture((112, 112), seed=5)
    fixed = texture[8:104, 8:104]
    moving = 1.0 - texture[9:105, 6:102]  # moving(p + (2, -1)) = 1 - fixed(p), (x, y) in mm
    errors = {}
    for metric in ("mind", "mse"):
        opt = FitOptions(initialize="identity", image_metric=metric)
        u, _ = fit_field(grid, _empty(grid), _empty(grid), grid, opt, fixed, moving)
        errors[metric] = float((u.data - torch.tensor([2.0, -1.0]).reshape(2, 1, 1))[:, 12:-12, 12:-12].norm(dim=0).median())
    assert errors["mind"] < 0.3 < 1.0 < errors["mse"], errors


def _moved_texture(contrast):
    """A 96² texture (structures of several pixels, as in images: starts are compared on the
    coarsest level, 8 px) and the same texture moved by (-9, 6) px through ``contrast``; the right
    and a wrong start (fixed → moving, mm)."""
    grid = Grid((96, 96), (1.0, 1.0))
    texture = _texture((128, 128), seed=6, sigma=6.0)
    fixed = Image(texture[16:112, 16:112], grid)
    moving = Image(contrast(texture[10:106, 25:121]), grid)
    right, wrong = np.eye(3), np.eye(3)
    right[:2, 2], wrong[:2, 2] = [-9.0, 6.0], [9.0, -6.0]
    return fixed, moving, right, wrong


def test_with_mind_the_start_choice_finds_the_move_of_an_inverted_contrast():
    from fmreg.optimize.fit import choose_start

    fixed, moving, right, wrong = _moved_texture(lambda t: 1.0 - t)  # moving(p + (-9, 6)) = 1 - fixed(p)
    opt = FitOptions(initialize="identity", image_metric="mind")
    assert choose_start(fixed, moving, right, opt).name == "candidate"
    assert choose_start(fixed, moving, wrong, opt).name == "usual"
    # MSE on the intensities cannot tell: the inverted contrast disagrees under every start.
    assert choose_start(fixed, moving, right, FitOptions(initialize="identity", image_metric="mse")).name == "usual"
    # The default (auto) sees the anti-correlation and compares descriptors.
    assert choose_start(fixed, moving, right, FitOptions(initialize="identity")).name == "candidate"


def test_with_lncc_starts_are_compared_on_descriptors():
    """``1 - LNCC`` is near 1 under any start far from the answer, so no ratio of two of them
    reaches the start margin; with ``image_metric="lncc"`` the starts are compared with MIND-SSC
    descriptors (set A of the known similarities: 30.4 px mean before, 2.8 px after)."""
    from fmreg.optimize.fit import START_MARGIN, FitReport, _start_level, choose_start, fit_intensities
    from fmreg.optimize.stages import Fitter

    fixed, moving, right, wrong = _moved_texture(lambda t: 0.5 * t + 0.2)  # another linear contrast
    grid = fixed.grid
    opt = FitOptions(initialize="identity", image_metric="lncc")
    assert choose_start(fixed, moving, right, opt).name == "candidate"
    assert choose_start(fixed, moving, wrong, opt).name == "usual"
    # The LNCC terms themselves rank the right start first, but within the margin.
    fitter = Fitter(opt, grid, grid, FitReport(), slice_axis=None, use_image=True)
    fitter.set_images(fit_intensities(fixed.data), fit_intensities(moving.data))
    right_term, identity_term = fitter.start_terms([right, np.eye(3)], _start_level(opt, fitter.grids))
    assert right_term < identity_term < START_MARGIN * right_term


def test_auto_takes_mind_for_an_inverted_contrast_and_mse_otherwise():
    from fmreg.optimize.fit import resolve_image_metric

    grid = Grid((96, 96), (1.0, 1.0))
    texture = _texture((112, 112), seed=5)
    fixed, moving = texture[8:104, 8:104], texture[9:105, 6:102]  # moving(p + (2, -1)) = fixed(p)
    for image, metric in ((moving, "mse"), (1.0 - moving, "mind")):
        u, report = fit_field(grid, _empty(grid), _empty(grid), grid, FitOptions(initialize="identity"), fixed, image)
        assert report.image_term["metric"] == metric
        assert (report.start_correlation < 0) == (metric == "mind")
        err = (u.data - torch.tensor([2.0, -1.0]).reshape(2, 1, 1))[:, 12:-12, 12:-12].norm(dim=0).median()
        assert float(err) < 0.3, (metric, float(err))
    opt, r = resolve_image_metric(Image(fixed, grid), Image(1.0 - moving, grid), None, FitOptions(initialize="identity"))
    assert opt.image_metric == "mind" and r < -0.5
    # A concrete metric is kept as given, without looking at the images.
    assert resolve_image_metric(Image(fixed, grid), Image(1.0 - moving, grid), None, FitOptions(image_metric="mse")) \
        == (FitOptions(image_metric="mse"), None)


def test_resample_masks_in_chunks_equals_all_at_once(monkeypatch):
    import fmreg.optimize.pyramid as pyramid

    grid = Grid((6, 20, 24), (1.5, 1.5, 8.0))
    gen = torch.Generator().manual_seed(1)
    fixed = torch.rand(5, *grid.shape, generator=gen) > 0.7
    moving = torch.rand(5, *grid.shape, generator=gen) > 0.7
    coarse = grid.resized((6, 10, 12))
    levels = []
    for chunk in (2, 64):
        monkeypatch.setattr(pyramid, "MASK_CHUNK", chunk)
        level = pyramid.Level(coarse)
        pyramid.resample_masks(level, fixed, moving, grid, 0)
        levels.append(level)
    torch.testing.assert_close(levels[0].fixed_masks, levels[1].fixed_masks, rtol=0, atol=0)
    torch.testing.assert_close(levels[0].moving_masks, levels[1].moving_masks, rtol=0, atol=0)
    torch.testing.assert_close(levels[0].support, levels[1].support, rtol=0, atol=0)
