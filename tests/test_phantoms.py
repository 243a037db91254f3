"""The built-in phantom pairs: geometry, labels, and a ground truth consistent with fmreg.transforms.displacement."""

import time

import numpy as np
import pytest
import torch

from fmreg.transforms.displacement import invert, jacobian_determinant

from fmreg.transforms.warp import warp, warp_labels
from fmreg.core.grid import Frame
from fmreg.phantoms import LABEL_NAMES, MAX_DISPLACEMENT_MM, make_pair, phantom_grid


def _dice(a: torch.Tensor, b: torch.Tensor, label: int) -> float:
    x, y = a == label, b == label
    return float(2 * (x & y).sum() / (x.sum() + y.sum()))


@pytest.fixture(scope="module", params=[2, 3], ids=["2d", "3d"])
def pair(request):
    return make_pair(request.param, seed=0)


def test_2d_grid_is_a_plain_1mm_slice():
    p = make_pair(2)
    g = p.fixed.grid
    assert g.shape == (160, 160)
    assert g.spacing == (1.0, 1.0)
    assert g.origin == (0.0, 0.0)
    assert np.allclose(g.direction_matrix(), np.eye(2))


def test_3d_grid_is_an_anisotropic_tilted_stack():
    p = make_pair(3)
    g = p.fixed.grid
    assert g.shape == (10, 96, 96)  # array order: 10 slices of 96×96
    assert g.spacing == pytest.approx((1.6, 1.6, 8.0))
    assert np.linalg.norm(g.origin) > 1.0
    d = g.direction_matrix()
    assert not np.allclose(d, np.eye(3))
    assert np.allclose(d @ d.T, np.eye(3), atol=1e-9)  # a rotation
    assert np.linalg.det(d) == pytest.approx(1.0)


def test_every_image_shares_the_fixed_grid(pair):
    g = pair.fixed.grid
    assert g == phantom_grid(g.ndim)
    for im in (pair.moving, pair.fixed_labels, pair.moving_labels):
        assert im.grid.same_as(g)
        assert tuple(im.data.shape) == g.shape
    assert pair.true_field.grid.same_as(g)
    assert pair.true_field.frame == Frame.PHYSICAL


def test_intensities_and_labels_have_the_right_types(pair):
    for im in (pair.fixed, pair.moving):
        assert im.data.dtype == torch.float32
        assert bool(torch.isfinite(im.data).all())
        assert 0.0 <= float(im.data.min()) and float(im.data.max()) < 2.0
    for lab in (pair.fixed_labels, pair.moving_labels):
        assert lab.data.dtype == torch.int64
        assert lab.is_label
        assert set(torch.unique(lab.data).tolist()) == {0, *LABEL_NAMES}
    assert sorted(LABEL_NAMES) == [1, 2, 3, 4, 5]


def test_true_field_is_a_small_diffeomorphism(pair):
    jac = jacobian_determinant(pair.true_field)
    assert float(jac.min()) > 0.3
    length = pair.true_field.data.norm(dim=0)
    assert float(length.max()) <= MAX_DISPLACEMENT_MM + 0.05
    assert float(length.max()) > 3.0  # the pair is worth registering


def test_true_field_maps_moving_labels_onto_fixed_labels(pair):
    # T is fixed→moving, so pulling the moving labels back through T gives the fixed ones.
    warped = warp_labels(pair.moving_labels, pair.true_field)
    before = {k: _dice(pair.moving_labels.data, pair.fixed_labels.data, k) for k in LABEL_NAMES}
    after = {k: _dice(warped.data, pair.fixed_labels.data, k) for k in LABEL_NAMES}
    assert all(d > 0.95 for d in after.values()), after
    assert min(before.values()) < 0.9  # without the field the labels do not line up


def test_fixed_labels_warped_into_moving_space_give_the_moving_labels(pair):
    # The inverse of T (moving→fixed, on the moving grid, which is the fixed grid here) warps
    # the fixed labels into the moving image.
    to_fixed = invert(pair.true_field)
    warped = warp_labels(pair.fixed_labels, to_fixed)
    dices = {k: _dice(warped.data, pair.moving_labels.data, k) for k in LABEL_NAMES}
    assert all(d > 0.95 for d in dices.values()), dices


def test_true_field_aligns_intensities(pair):
    warped = warp(pair.moving, pair.true_field)
    before = float(((pair.moving.data - pair.fixed.data) ** 2).mean())
    after = float(((warped.data - pair.fixed.data) ** 2).mean())
    assert after < 0.5 * before


@pytest.mark.parametrize("ndim", [2, 3])
def test_same_seed_same_pair_other_seed_other_pair(ndim):
    a, b, c = make_pair(ndim, seed=3), make_pair(ndim, seed=3), make_pair(ndim, seed=4)
    for name in ("fixed", "moving", "fixed_labels", "moving_labels"):
        assert torch.equal(getattr(a, name).data, getattr(b, name).data)
    assert torch.equal(a.true_field.data, b.true_field.data)
    assert not torch.equal(a.moving.data, c.moving.data)
    assert not torch.equal(a.true_field.data, c.true_field.data)


@pytest.mark.parametrize("ndim", [2, 3])
def test_generation_is_fast(ndim):
    make_pair(ndim)  # warm-up: imports and allocator
    start = time.perf_counter()
    make_pair(ndim, seed=1)
    # About 0.1 s (2D) and 0.4 s (3D) on one idle core; the bound leaves room for busy CI.
    assert time.perf_counter() - start < 5.0


def test_other_dimensionalities_are_rejected():
    with pytest.raises(ValueError):
        make_pair(4)
