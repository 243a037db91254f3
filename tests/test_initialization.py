"""Moments initialisation (fmreg.optimize.initialization) on objects with known extents."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.testing import assert_close

from fmreg.transforms.warp import warp
from fmreg.core.grid import Frame, Grid
from fmreg.core.image import Image
from fmreg.optimize.initialization import moments_affine
from fmreg.segment.object import object_mask
from fmreg.optimize.fit import FitOptions, fit_field

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _ellipsoid(grid: Grid, centre, semi) -> torch.Tensor:
    x = grid.coordinates(Frame.PHYSICAL, dtype=torch.float64)
    return sum(((x[i] - centre[i]) / semi[i]) ** 2 for i in range(grid.ndim)) <= 1.0


def _body(grid: Grid, centre, semi, level: float = 100.0, background: float = 0.0) -> Image:
    """A bright ellipsoidal 'body' with a darker inner 'organ', on a flat background."""
    body = _ellipsoid(grid, centre, semi).float()
    organ = _ellipsoid(grid, centre, [s / 3 for s in semi]).float()
    return Image(background + level * body - 0.4 * level * organ, grid)


def test_object_mask_is_the_body_with_its_holes_filled():
    grid = Grid((80, 100), (1.0, 1.0))
    image = _body(grid, (50.0, 40.0), (30.0, 25.0))
    mask = object_mask(image)
    truth = _ellipsoid(grid, (50.0, 40.0), (30.0, 25.0))
    assert mask is not None
    # Smoothing moves the outline by at most a voxel; the darker organ is filled in.
    assert float((mask ^ truth).sum()) / float(truth.sum()) < 0.05
    assert bool(mask[40, 50])


@pytest.mark.parametrize(
    "centre, semi, why",
    [((50.0, 40.0), (60.0, 25.0), "cut by the field of view"), ((50.0, 40.0), (6.0, 5.0), "too small")],
)
def test_object_mask_refuses_an_object_that_is_not_a_whole_body(centre, semi, why):
    grid = Grid((80, 100), (1.0, 1.0))
    assert object_mask(_body(grid, centre, semi)) is None, why


def test_object_mask_of_a_flat_image_is_none():
    assert object_mask(Image(torch.full((20, 30), 7.0), Grid((20, 30)))) is None


def test_moments_affine_recovers_scale_and_shift_on_anisotropic_grids():
    # Fixed on a 1 × 2 mm grid, moving on a 1.5 × 1 mm grid with another origin; the moving
    # body is the fixed one scaled by (0.8, 1.25) about its centre and moved by (6, -4) mm.
    fixed_grid = Grid((60, 120), (1.0, 2.0))  # array (y, x): spacing is x, y
    moving_grid = Grid((150, 90), (1.5, 1.0), origin=(-10.0, 5.0))
    cf, semi = np.array([60.0, 70.0]), np.array([30.0, 40.0])
    scale, shift = np.array([0.8, 1.25]), np.array([6.0, -4.0])
    fixed = _body(fixed_grid, cf, semi)
    moving = _body(moving_grid, cf + shift, semi * scale, level=40.0, background=5.0)
    h = moments_affine(fixed, moving)
    assert h is not None
    assert_close(torch.tensor(np.diag(h)[:2]), torch.tensor(scale), atol=0.02, rtol=0)
    assert_close(torch.tensor(h[:2, :2] - np.diag(np.diag(h)[:2])), torch.zeros(2, 2, dtype=torch.float64))
    # The fixed centre goes to the moving centre.
    assert_close(torch.tensor(h[:2, :2] @ cf + h[:2, 2]), torch.tensor(cf + shift), atol=0.5, rtol=0)


def test_moments_affine_is_none_without_a_whole_object():
    grid = Grid((80, 100), (1.0, 1.0))
    body = _body(grid, (50.0, 40.0), (30.0, 25.0))
    cropped = _body(grid, (50.0, 40.0), (70.0, 60.0))
    assert moments_affine(body, cropped) is None
    assert moments_affine(cropped, body) is None


def test_without_deformable_steps_the_fit_returns_exactly_the_moments_affine():
    # Oblique, anisotropic fixed grid: checks the physical → normalized conversion of the start.
    c, s_ = np.cos(0.3), np.sin(0.3)
    fixed_grid = Grid((70, 90), (1.2, 0.9), origin=(-20.0, 10.0), direction=(c, -s_, s_, c))
    moving_grid = Grid((100, 100), (1.0, 1.0), origin=(-25.0, 5.0))
    centre = fixed_grid.coordinates(Frame.PHYSICAL, dtype=torch.float64)[:, 35, 45].numpy()
    fixed = _body(fixed_grid, centre, (32.0, 20.0))
    moving = _body(moving_grid, centre + np.array([4.0, -3.0]), (27.0, 18.0))
    h = moments_affine(fixed, moving)
    assert h is not None
    empty = torch.zeros((0, *fixed_grid.shape))
    opt = FitOptions(iterations=0)
    u, report = fit_field(fixed_grid, empty, empty.new_zeros((0, *moving_grid.shape)), moving_grid, opt,
                          fixed.data, moving.data)
    assert_close(torch.tensor(report.initial_affine_mm, dtype=torch.float64), torch.tensor(h))
    x = fixed_grid.coordinates(Frame.PHYSICAL, dtype=torch.float64)
    expected = torch.einsum("ij,j...->i...", torch.tensor(h[:2, :2]), x) + torch.tensor(h[:2, 2]).reshape(2, 1, 1) - x
    assert_close(u.data.double(), expected, atol=1e-3, rtol=0)


def test_the_moments_start_then_the_fit_align_a_shrunk_and_shifted_body():
    grid = Grid((96, 96), (1.0, 1.0))
    fixed_centre, fixed_semi = (48.0, 48.0), (36.0, 28.0)
    moving_centre, moving_semi = (54.0, 42.0), (27.0, 22.0)
    fixed, moving = _body(grid, fixed_centre, fixed_semi), _body(grid, moving_centre, moving_semi, level=60.0)
    empty = torch.zeros((0, *grid.shape))
    u, report = fit_field(grid, empty, empty, grid, FitOptions(), fixed.data, moving.data)
    assert report.initial_affine_mm is not None
    for shrink in (1.0, 3.0):  # the body and its inner organ
        f = _ellipsoid(grid, fixed_centre, [s / shrink for s in fixed_semi])
        m = Image(_ellipsoid(grid, moving_centre, [s / shrink for s in moving_semi]).float(), grid)
        w = warp(m, u).data > 0.5
        assert float(2 * (w & f).sum() / (w.sum() + f.sum())) > 0.95
