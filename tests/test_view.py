"""Padding frames (fmreg.core.view) and SAMReg's image term inside a frame both images share."""

from __future__ import annotations

import torch

from fmreg.core.grid import Grid
from fmreg.core.image import Image
from fmreg.core.view import padding_mask, shared_frame_views
from fmreg.optimize.fit import FitOptions, fit_field

SIDE = 96


def _aperture(shape=(SIDE, SIDE), radius=40.0) -> torch.Tensor:
    y, x = torch.meshgrid(torch.arange(float(shape[0])), torch.arange(float(shape[1])), indexing="ij")
    return (y - (shape[0] - 1) / 2) ** 2 + (x - (shape[1] - 1) / 2) ** 2 <= radius**2


def _texture(shift_x: float = 0.0) -> torch.Tensor:
    """Smooth blobs, positive everywhere, moved by ``shift_x`` pixels along x."""
    y, x = torch.meshgrid(torch.arange(float(SIDE)), torch.arange(float(SIDE)), indexing="ij")
    x = x - shift_x
    return 2.0 + torch.sin(x / 6.0) * torch.cos(y / 7.0) + 0.5 * torch.sin((x + y) / 11.0)


def test_padding_is_the_border_connected_minimum_and_a_dark_hole_inside_is_not():
    data = torch.full((20, 30), 5.0)
    data[:3] = 0.0  # a frame along the top
    data[10:12, 10:12] = 0.0  # as dark, but enclosed by the view
    data[5, 0] = 0.04  # within 1 % of the span: compression noise in the frame
    expected = torch.zeros(20, 30, dtype=torch.bool)
    expected[:3] = True
    expected[5, 0] = True
    torch.testing.assert_close(padding_mask(data), expected)


def test_a_frame_both_images_share_is_found_and_one_they_do_not_share_is_not():
    grid = Grid((SIDE, SIDE))
    disc = _aperture()
    fixed = Image(_texture() * disc, grid)
    moving = Image(_texture(5.0) * disc, grid)
    views = shared_frame_views(fixed, moving)
    assert views is not None
    torch.testing.assert_close(views[0], disc.float())
    torch.testing.assert_close(views[1], disc.float())
    # A background that moves with the anatomy (two skull-stripped brains) is not a frame.
    other = Image(_texture(5.0) * _aperture(radius=30.0), grid)
    assert shared_frame_views(fixed, other) is None
    # Neither is a frame of a few pixels.
    corner = _texture()
    corner[0, :4] = 0.0
    assert shared_frame_views(Image(corner, grid), Image(corner, grid)) is None


def test_a_noisy_frame_both_images_share_is_found():
    """Noise of 1 % of the span outside the aperture, drawn anew for each image: the frames'
    views overlap with an IoU of 0.95 only, but most of their edges coincide."""
    gen = torch.Generator().manual_seed(1)
    disc = _aperture()

    def noisy(shift: float) -> torch.Tensor:
        img = _texture(shift)
        return torch.where(disc, img, (0.01 * float(img.max()) * torch.randn(disc.shape, generator=gen)).abs())

    grid = Grid((SIDE, SIDE))
    fixed, moving = noisy(0.0), noisy(5.0)
    for data in (fixed, moving):
        assert float((padding_mask(data) == ~disc).float().mean()) > 0.97  # measured: 0.98
    assert shared_frame_views(Image(fixed, grid), Image(moving, grid)) is not None


def _fit_rim_error() -> float:
    """Mean |x error| (px) in a ring inside the aperture's rim: the anatomy moves 4 px along x
    inside one circular aperture (``T(x) = x - 4``)."""
    grid = Grid((SIDE, SIDE))
    disc = _aperture()
    fixed, moving = _texture() * disc, _texture(-4.0) * disc
    opt = FitOptions(levels=2, iterations=(60, 40), refine_iterations=0, verify_dice=None, initialize="identity",
                     fine_min_correlation=1.01)
    u, _ = fit_field(grid, torch.zeros(0, SIDE, SIDE), torch.zeros(0, SIDE, SIDE), grid, opt, fixed, moving)
    rim = _aperture(radius=38.0) & ~_aperture(radius=30.0)
    return float((u.data[0] + 4.0).abs()[rim].mean())


def test_inside_a_shared_aperture_the_frame_does_not_pull_the_field(monkeypatch):
    """Measured: 0.56 px at the rim inside the shared view; 1.08 px when the frame's edge is
    counted, which holds the field towards the identity there."""
    assert _fit_rim_error() < 0.75
    monkeypatch.setattr("fmreg.optimize.stages.shared_frame_views", lambda fixed, moving: None)
    assert _fit_rim_error() > 0.9
