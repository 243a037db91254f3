"""Analytic checks of warping, composition, inversion and Jacobians on physical grids."""

import math

import numpy as np
import pytest
import torch

from fmreg.errors import FmregError
from fmreg.transforms.displacement import DisplacementField, compose, invert, jacobian_determinant
from fmreg.transforms.warp import warp, warp_labels
from fmreg.core.grid import Frame, Grid
from fmreg.core.image import Image


def _rot3(deg: float) -> tuple[float, ...]:
    a = math.radians(deg)
    return (math.cos(a), -math.sin(a), 0.0, math.sin(a), math.cos(a), 0.0, 0.0, 0.0, 1.0)


def _affine_field(grid: Grid, matrix: np.ndarray, offset: np.ndarray) -> DisplacementField:
    """u(x) = (A - I) x + b in physical mm: T(x) = A x + b."""
    x = grid.coordinates(Frame.PHYSICAL, dtype=torch.float64)
    a = torch.as_tensor(matrix, dtype=torch.float64)
    tx = torch.einsum("ij,j...->i...", a, x) + torch.as_tensor(offset, dtype=torch.float64).reshape(-1, *[1] * grid.ndim)
    return DisplacementField((tx - x).float(), grid)


def test_translation_on_anisotropic_grid_moves_by_whole_voxels():
    grid = Grid((6, 10, 12), spacing=(1.5, 2.0, 10.0), origin=(5.0, -3.0, 40.0))
    data = torch.arange(grid.numel, dtype=torch.float32).reshape(grid.shape)
    moving = Image(data, grid)
    # T(x) = x + (3 mm, 4 mm, 10 mm): two voxels in x, two in y, one slice in z.
    u = torch.zeros((3, *grid.shape))
    u[0], u[1], u[2] = 3.0, 4.0, 10.0
    out = warp(moving, DisplacementField(u, grid)).data
    torch.testing.assert_close(out[:-1, :-2, :-2], data[1:, 2:, 2:])
    assert float(out[-1].abs().max()) == 0.0  # beyond the last slice: fill value


def test_rotation_with_oblique_direction_matches_index_permutation():
    # A 90° rotation about the grid centre maps voxel (i, j) to (j, n-1-i) exactly.
    n = 9
    grid = Grid((n, n), spacing=(0.7, 0.7), origin=(2.0, 1.0), direction=(0.0, -1.0, 1.0, 0.0))
    data = torch.rand(n, n)
    centre = grid.convert_points(torch.tensor([(n - 1) / 2] * 2, dtype=torch.float64), Frame.VOXEL, Frame.PHYSICAL).numpy()
    rot = np.array([[0.0, -1.0], [1.0, 0.0]])
    field = _affine_field(grid, rot, centre - rot @ centre)
    out = warp(Image(data, grid), field).data
    # 2D rotations commute with the (rotation) direction matrix, so in index space
    # out(x, y) = data(c - (y - c), c + (x - c)), i.e. out[row, col] = data[col, n - 1 - row].
    torch.testing.assert_close(out, torch.rot90(data, k=1, dims=(0, 1)), atol=1e-4, rtol=0)


def test_jacobian_of_known_affine_on_anisotropic_oblique_grid():
    grid = Grid((5, 7, 9), spacing=(1.2, 0.8, 6.0), origin=(1.0, 2.0, 3.0), direction=_rot3(35))
    a = np.array([[1.1, 0.2, 0.0], [-0.1, 0.9, 0.05], [0.0, 0.1, 1.3]])
    det = jacobian_determinant(_affine_field(grid, a, np.array([1.0, -2.0, 0.5])))
    torch.testing.assert_close(det, torch.full(grid.shape, float(np.linalg.det(a))), atol=1e-4, rtol=1e-4)


def test_jacobian_flags_folding():
    grid = Grid((8, 8), spacing=(2.0, 1.0))
    field = _affine_field(grid, np.array([[-1.0, 0.0], [0.0, 1.0]]), np.zeros(2))
    torch.testing.assert_close(jacobian_determinant(field), torch.full((8, 8), -1.0))


def test_compose_of_translations_adds_and_inverse_cancels():
    grid = Grid((6, 8, 8), spacing=(1.0, 1.5, 3.0))
    a = DisplacementField(torch.zeros(3, *grid.shape), grid)
    a.data[0] = 1.5
    b = DisplacementField(torch.zeros(3, *grid.shape), grid)
    b.data[2] = -3.0
    c = compose(a, b)
    torch.testing.assert_close(c.data[0], torch.full(grid.shape, 1.5))
    torch.testing.assert_close(c.data[2], torch.full(grid.shape, -3.0))
    inv = invert(c)
    torch.testing.assert_close(inv.data, -c.data)


def test_invert_smooth_field_round_trip():
    grid = Grid((32, 32), spacing=(1.0, 2.0))
    x = grid.coordinates(Frame.PHYSICAL)
    u = torch.stack([2.0 * torch.sin(x[1] / 10.0), 1.5 * torch.cos(x[0] / 8.0)])
    field = DisplacementField(u, grid)
    identity = compose(invert(field), field)
    inner = identity.data[:, 4:-4, 4:-4]
    # Linear resampling of u costs ~h²|u''|/8 per lookup (≈0.01 mm here, twice): the residual
    # is interpolation error, a wrong inverse would leave millimetres.
    assert float(inner.abs().max()) < 3e-2


def test_frames_are_consistent_for_voxel_shift():
    grid = Grid((4, 5, 6), spacing=(2.0, 3.0, 10.0), direction=_rot3(90))
    f = DisplacementField(torch.zeros(3, *grid.shape), grid, Frame.VOXEL)
    f.data[0] = 1.0  # one voxel along index x = 2 mm along world y (direction rotates x→y)
    phys = f.to(Frame.PHYSICAL).data
    torch.testing.assert_close(phys[0], torch.zeros(grid.shape), atol=1e-6, rtol=0)
    torch.testing.assert_close(phys[1], torch.full(grid.shape, 2.0))


def test_label_warp_keeps_values_and_smooth_option():
    grid = Grid((10, 10), spacing=(1.0, 1.0))
    labels = torch.zeros(10, 10, dtype=torch.int64)
    labels[2:6, 2:6] = 7
    labels[6:9, 5:9] = 300
    u = torch.zeros(2, 10, 10)
    u[0] = 1.0
    for smooth in (False, True):
        out = warp_labels(Image(labels, grid), DisplacementField(u, grid), smooth=smooth).data
        assert out.dtype == torch.int64
        assert set(torch.unique(out).tolist()) <= {0, 7, 300}
        torch.testing.assert_close(out[:, :-1], labels[:, 1:])


def test_field_shape_checked():
    with pytest.raises(FmregError):
        DisplacementField(torch.zeros(2, 4, 4), Grid((4, 4, 4)))


def test_jacobian_in_slabs_equals_the_whole(monkeypatch):
    from fmreg.transforms import displacement as D

    rng = np.random.default_rng(0)
    grid = Grid((37, 29, 11), (0.7, 1.3, 2.0), (1.0, 2.0, 3.0), tuple(np.linalg.qr(rng.normal(size=(3, 3)))[0].ravel()))
    u = D.DisplacementField(torch.from_numpy(rng.normal(size=(3, *grid.shape))).float(), grid)
    whole = D.jacobian_determinant(u)
    monkeypatch.setattr(D, "JACOBIAN_CHUNK_VOXELS", 29 * 11 * 3)  # slabs of 3 rows
    torch.testing.assert_close(D.jacobian_determinant(u), whole, atol=0, rtol=0)


@pytest.mark.parametrize("mode", ["linear", "nearest"])
def test_sampling_in_slabs_equals_sampling_at_once(monkeypatch, mode):
    from fmreg.core import sampling

    grid = Grid((6, 20, 30), (0.7, 1.3, 2.0), (2.0, 3.0, -1.0))
    data = torch.randn(2, *grid.shape, generator=torch.Generator().manual_seed(0))
    points = grid.coordinates(Frame.PHYSICAL) + 2 * torch.randn(3, *grid.shape, generator=torch.Generator().manual_seed(1))
    whole = sampling.sample(data, grid, points, mode)
    monkeypatch.setattr(sampling, "SAMPLE_CHUNK_POINTS", 700)  # slabs of one slice
    torch.testing.assert_close(sampling.sample(data, grid, points, mode), whole, atol=0, rtol=0)
    torch.testing.assert_close(sampling.sample(data[0], grid, points, mode), whole[0], atol=0, rtol=0)
