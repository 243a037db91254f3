"""Transforms as objects: affine, stationary velocity, displacement and their composition."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch.testing import assert_close

from fmreg.core.grid import Frame, Grid
from fmreg.core.image import Image
from fmreg.core.sampling import identity_points
from fmreg.transforms.affine import AffineTransform
from fmreg.transforms.displacement import DisplacementField, DisplacementTransform, invert
from fmreg.transforms.sequential import SequentialTransform
from fmreg.transforms.velocity import (
    StationaryVelocity,
    automatic_steps,
    scaling_and_squaring,
    slicewise_scaling_and_squaring,
)
from fmreg.transforms.warp import warp

# An oblique, anisotropic 3D grid: every frame conversion matters.
_C, _S = math.cos(0.3), math.sin(0.3)
GRID3 = Grid((6, 9, 11), (0.8, 1.5, 4.0), (10.0, -5.0, 3.0), (_C, -_S, 0, _S, _C, 0, 0, 0, 1))
GRID2 = Grid((20, 24), (1.5, 0.5), (3.0, -2.0))


def _rotation_mm(ndim: int) -> np.ndarray:
    h = np.eye(ndim + 1)
    h[0, 0], h[0, 1], h[1, 0], h[1, 1] = _C, -_S, _S, _C
    h[:ndim, ndim] = [2.0, -1.0, 0.5][:ndim]
    return h


@pytest.mark.parametrize("grid", [GRID2, GRID3], ids=["2d", "3d"])
def test_affine_from_physical_maps_every_voxel_to_its_physical_image(grid):
    h = _rotation_mm(grid.ndim)
    t = AffineTransform.from_physical(h, grid)
    x = grid.coordinates(Frame.PHYSICAL, dtype=torch.float64)
    expected = torch.einsum("ij,j...->i...", torch.as_tensor(h[:-1, :-1]), x) + torch.as_tensor(h[:-1, -1]).reshape(-1, *[1] * grid.ndim)
    assert_close(t.points(), expected.float(), atol=1e-4, rtol=0)
    u = t.field()
    assert u.frame == Frame.PHYSICAL and u.grid == grid
    assert_close(u.data, (expected - x).float(), atol=1e-4, rtol=0)


@pytest.mark.parametrize("grid", [GRID2, GRID3], ids=["2d", "3d"])
def test_affine_to_physical_gives_back_the_physical_map(grid):
    h = _rotation_mm(grid.ndim)
    np.testing.assert_allclose(AffineTransform.from_physical(h, grid).to_physical(), h, atol=1e-5)


def test_affine_inverse_undoes_it_and_the_identity_is_exact():
    t = AffineTransform.from_physical(_rotation_mm(3), GRID3)
    both = SequentialTransform(t, t.inverse())
    assert_close(both.field().data, torch.zeros(3, *GRID3.shape), atol=1e-4, rtol=0)
    assert torch.equal(AffineTransform.identity(GRID3).field().data, torch.zeros(3, *GRID3.shape))
    assert t.is_orientation_preserving()
    flip = AffineTransform(torch.diag(torch.tensor([-1.0, 1.0, 1.0])), torch.zeros(3), GRID3)
    assert not flip.is_orientation_preserving()


def test_constant_physical_velocity_is_that_translation_in_mm():
    shift = torch.tensor([1.2, -0.7, 3.0])  # mm along world x, y, z
    v = shift.reshape(3, 1, 1, 1).expand(3, 4, 5, 6).contiguous()
    t = StationaryVelocity(v, GRID3, Frame.PHYSICAL, steps=6)
    u = t.field()
    assert_close(u.data, shift.reshape(3, 1, 1, 1).expand_as(u.data), atol=1e-4, rtol=0)
    back = SequentialTransform(t, t.inverse())
    assert_close(back.field().data, torch.zeros_like(u.data), atol=1e-4, rtol=0)


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_slicewise_integration_equals_3d_integration_of_an_in_plane_field(axis):
    # A field with no component along `axis` keeps every point on its slice, so integrating
    # each slice in 2D must give what 3D integration gives.
    torch.manual_seed(axis)
    v = 0.3 * torch.nn.functional.interpolate(torch.randn(2, 3, 3, 4, 3), size=(5, 7, 6), mode="trilinear",
                                              align_corners=True).movedim(1, -1)
    v[..., 2 - axis] = 0.0
    expected = scaling_and_squaring(v, 6)
    got = slicewise_scaling_and_squaring(v, axis, 6)
    assert expected.abs().max() > 0.05  # a real deformation, not a near-identity
    assert_close(got, expected, atol=1e-6, rtol=0)


def test_in_plane_velocity_drops_the_through_plane_component_on_an_oblique_grid():
    torch.manual_seed(0)
    v = torch.randn(3, 4, 5, 6)  # physical mm, world axes, with a through-plane part
    m = torch.as_tensor(GRID3.resized([4, 5, 6]).frame_matrix(Frame.PHYSICAL, Frame.NORMALIZED)[:3, :3],
                        dtype=torch.float32)
    normalized = torch.einsum("ij,j...->i...", m, v)
    normalized[2] = 0.0  # no motion along array axis 0
    projected = torch.einsum("ij,j...->i...", torch.linalg.inv(m), normalized)
    got = StationaryVelocity(v, GRID3, Frame.PHYSICAL, steps=5, in_plane_axis=0).field().data
    assert_close(got, StationaryVelocity(projected, GRID3, Frame.PHYSICAL, steps=5).field().data, atol=1e-5, rtol=0)
    normal = torch.as_tensor(GRID3.direction_matrix()[:, 2], dtype=torch.float32)
    assert_close(torch.einsum("c,c...->...", normal, got), torch.zeros(GRID3.shape), atol=1e-5, rtol=0)


@pytest.mark.parametrize("voxels, expected", [(0.0, 0), (0.5, 0), (0.51, 1), (1.0, 1), (1.9, 2), (4.0, 3), (1e6, 7)])
def test_automatic_steps_scale_the_largest_velocity_under_half_a_voxel(voxels, expected):
    shape = (5, 9, 17)  # x voxel = 2/16 normalized units
    v = torch.zeros(1, *shape, 3)
    v[0, 2, 3, 4] = torch.tensor([0.6, 0.8, 0.0]) * voxels * (2 / 16)  # |v| = voxels along x's spacing
    v[0, 2, 3, 4, 1] *= 16 / 8  # y's voxel is 2/8 normalized units
    assert automatic_steps(v, shape, 7) == expected


def test_automatic_steps_integrate_a_translation_exactly():
    shift = torch.tensor([30.0, -12.0, 4.0])  # mm: many voxels, so several squarings
    v = shift.reshape(3, 1, 1, 1).expand(3, 4, 5, 6).contiguous()
    u = StationaryVelocity(v, GRID3, Frame.PHYSICAL, steps=7, automatic_steps=True).field()
    assert_close(u.data, shift.reshape(3, 1, 1, 1).expand_as(u.data), atol=1e-3, rtol=0)


def test_sequential_applies_its_transforms_in_order():
    # T(x) = A(exp(v)(x)): translate by 2 mm along x, then rotate about the origin.
    grid = GRID2
    v = torch.tensor([2.0, 0.0]).reshape(2, 1, 1).expand(2, 5, 6).contiguous()
    h = _rotation_mm(2)
    h[:2, 2] = 0.0
    t = SequentialTransform(StationaryVelocity(v, grid), AffineTransform.from_physical(h, grid))
    x = grid.coordinates(Frame.PHYSICAL, dtype=torch.float64)
    moved = x + torch.tensor([2.0, 0.0], dtype=torch.float64).reshape(2, 1, 1)
    expected = torch.einsum("ij,j...->i...", torch.as_tensor(h[:2, :2]), moved)
    assert_close(t.points(), expected.float(), atol=1e-4, rtol=0)
    # Generic point mapping agrees with the grid fast path.
    pts = identity_points(grid.shape)
    assert_close(t.map_normalized(pts), t.normalized_points(), atol=1e-5, rtol=0)


def test_displacement_transform_round_trips_a_field_and_inverts_it():
    x = GRID2.coordinates(Frame.PHYSICAL)
    # A smooth field (Lipschitz constant about 0.25): invertible, so the fixed point converges.
    data = torch.stack([0.5 * torch.sin(2 * math.pi * x[1] / 12.0), 0.4 * torch.cos(2 * math.pi * x[0] / 10.0)])
    field = DisplacementField(data, GRID2, Frame.PHYSICAL)
    t = field.transform()
    assert_close(t.field().data, data, atol=1e-5, rtol=0)
    assert_close(t.inverse().field().data, invert(field).data, atol=1e-5, rtol=0)
    # T⁻¹ ∘ T is the identity up to linear interpolation of a 10–12 mm wavelength on a
    # 1.5 mm grid (a 0.5 mm field leaves under 0.1 mm).
    round_trip = SequentialTransform(t, t.inverse())
    interior = (slice(None), slice(3, -3), slice(3, -3))
    assert float(round_trip.field().data[interior].abs().max()) < 0.1


def test_warping_with_a_transform_equals_warping_with_its_field():
    g = torch.Generator().manual_seed(2)
    moving = Image(torch.rand(GRID2.shape, generator=g), GRID2)
    t = AffineTransform.from_physical(_rotation_mm(2), GRID2)
    assert_close(warp(moving, t).data, warp(moving, t.field()).data, atol=1e-4, rtol=0)


def test_parameters_may_be_a_networks_output_batched():
    # A batch of two velocities from a (here: linear) network: gradients reach its weights.
    net = torch.nn.Conv2d(1, 2, 1)
    x = torch.rand(2, 1, 5, 6)
    t = StationaryVelocity(0.1 * net(x), GRID2, Frame.NORMALIZED, steps=4)
    pts = t.normalized_points((10, 12))
    assert pts.shape == (2, 10, 12, 2)
    pts.square().mean().backward()
    assert net.weight.grad is not None and float(net.weight.grad.abs().sum()) > 0
    batched = AffineTransform(torch.eye(2).expand(2, 2, 2) * torch.tensor([1.0, 2.0]).reshape(2, 1, 1),
                              torch.zeros(2, 2), GRID2)
    out = batched.map_normalized(identity_points((3, 4)).expand(2, 3, 4, 2))
    assert_close(out[1], 2 * identity_points((3, 4))[0])
    disp = DisplacementTransform(torch.zeros(2, 2, 5, 6), GRID2)
    assert disp.normalized_points().shape == (2, *GRID2.shape, 2)


def test_scaling_and_squaring_builds_its_identity_when_not_given():
    v = torch.full((1, 4, 5, 2), 0.1)
    assert_close(scaling_and_squaring(v, 5), scaling_and_squaring(v, 5, identity_points((4, 5))))


@pytest.mark.parametrize("shape", [(9, 11), (5, 7, 6)])
def test_scaling_and_squaring_of_a_constant_velocity_is_that_translation(shape):
    ndim = len(shape)
    v = torch.tensor([0.3, -0.2, 0.45][:ndim])  # normalized units, x first
    v_field = v.expand(1, *shape, ndim).contiguous()
    ident = identity_points(shape)
    u = scaling_and_squaring(v_field, steps=7, identity=ident)
    assert u.shape == (1, *shape, ndim)
    # A constant field composed with itself stays constant: exp(v) is the translation by v,
    # everywhere (the interior trivially; border padding extends the constant outside).
    assert_close(u, v_field)
    assert_close(scaling_and_squaring(torch.zeros_like(v_field), 7, ident), torch.zeros_like(v_field))


def test_scaling_and_squaring_of_a_linear_contraction_is_its_exponential():
    # v(x) = a x (x component only, a < 0): the flow x' = a x keeps every point inside the
    # grid and linear interpolation of a linear field is exact, so exp(v)(x) = x e^a up to the
    # scaling-and-squaring error, relative ~ a²/2^(steps+1) (about 1e-3 for a = -0.5, 7 steps).
    shape = (5, 33)
    a = -0.5
    ident = identity_points(shape)
    v = torch.zeros(1, *shape, 2)
    v[..., 0] = a * ident[..., 0]
    u = scaling_and_squaring(v, steps=7, identity=ident)
    expected = torch.zeros_like(u)
    expected[..., 0] = ident[..., 0] * (math.exp(a) - 1)
    assert_close(u, expected, atol=2e-3, rtol=0)
