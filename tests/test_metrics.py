"""Metrics on hand-countable shapes: every expected value is derived in the comments."""

from __future__ import annotations

import math

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from torch.testing import assert_close

from fmreg.errors import FmregError
from fmreg.core.grid import Frame, Grid
from fmreg.evaluate.metrics import (
    average_surface_distance,
    centroid_tre,
    dice,
    folding_percent,
    hausdorff_distance,
    hd95,
    landmark_tre,
    std_log_jacobian,
    surface_distances,
)

NAN = float("nan")

# An exact rotation with rational entries (rows and columns orthonormal, det +1).
ROTATION = tuple((np.array([[2, -1, 2], [2, 2, -1], [-1, 2, 2]]) / 3.0).ravel())


def _close(actual, expected) -> None:
    assert_close(torch.as_tensor(actual, dtype=torch.float64),
                 torch.as_tensor(expected, dtype=torch.float64), equal_nan=True)


# ------------------------------------------------------------------------------ Dice
def _two_squares() -> tuple[torch.Tensor, torch.Tensor]:
    pred = torch.zeros(8, 8, dtype=torch.int64)
    target = torch.zeros(8, 8, dtype=torch.int64)
    pred[0:4, 0:4] = 1
    target[0:4, 2:6] = 1  # overlap: rows 0-3 × cols 2-3 = 8 pixels
    pred[7, 7] = 3  # label 3 only in pred
    return pred, target


def test_dice_overlapping_squares_per_label_with_background():
    pred, target = _two_squares()
    with pytest.warns(RuntimeWarning, match="label 2 is absent from both"):
        scores = dice(pred, target, [0, 1, 2, 3])
    assert list(scores) == [0, 1, 2, 3]
    # label 1: 2·8 / (16 + 16)
    _close(scores[1], 0.5)
    # label 0: |pred bg| = 64-16-1 = 47, |target bg| = 48, both bg = 64 - |union| = 64-24-1 = 39
    _close(scores[0], 2 * 39 / (47 + 48))
    _close(scores[2], NAN)
    _close(scores[3], 0.0)


def test_dice_identical_and_shape_mismatch():
    pred, _ = _two_squares()
    assert dice(pred, pred.clone(), [1]) == {1: 1.0}
    with pytest.raises(FmregError, match="shape"):
        dice(pred, pred[:4], [1])
    with pytest.raises(FmregError, match="integers"):
        dice(pred, pred, [1.5])


# ------------------------------------------------------------------------------ surfaces
# Array (Z, Y, X) = (12, 12, 12) with spacing x=1, y=2, z=10 mm (given x, y, z).
ANISO = Grid((12, 12, 12), spacing=(1.0, 2.0, 10.0), origin=(5.0, -3.0, 7.0), direction=ROTATION)


def _box(lo: tuple[int, int, int], size: int = 4) -> torch.Tensor:
    m = torch.zeros(ANISO.shape, dtype=torch.bool)
    z, y, x = lo
    m[z:z + size, y:y + size, x:x + size] = True
    return m


# A 4×4×4 box has 56 surface voxels (64 minus the 2×2×2 interior). Shifting it by 2 voxels
# along one array axis with spacing s (the other two spacings are ≥ 1 = the smallest): per
# direction, the 16 voxels of the trailing face are 2s from the other box's leading face,
# the 12 ring voxels of the next layer are s away, the 24 ring/face voxels inside the other
# box's surface are 0, and the 4 centre voxels of the leading face are min(spacing) = 1 mm
# from the other box's surface. So HD = HD95 = 2s (52.25th order statistic of 56 is in the top
# 16) and ASD = (4·1 + 12·s + 16·2s) / 56.
@pytest.mark.parametrize(
    "axis, s",
    [(0, 10.0), (1, 2.0), (2, 1.0)],  # array axis 0 = z (10 mm), 1 = y (2 mm), 2 = x (1 mm)
)
def test_shifted_box_on_anisotropic_3d_grid(axis, s):
    lo = [2, 2, 2]
    a = _box(tuple(lo))
    lo[axis] += 2
    b = _box(tuple(lo))
    expected_asd = (4 * 1 + 12 * s + 16 * 2 * s) / 56
    _close(hd95(a, b, ANISO), 2 * s)
    _close(hausdorff_distance(a, b, ANISO), 2 * s)
    _close(average_surface_distance(a, b, ANISO), expected_asd)
    ab, ba = surface_distances(a, b, ANISO)
    expected = torch.tensor(sorted([0.0] * 24 + [1.0] * 4 + [s] * 12 + [2 * s] * 16),
                            dtype=torch.float64)
    _close(ab.sort().values, expected)
    _close(ba.sort().values, expected)


def test_identical_masks_have_zero_distance():
    a = _box((3, 3, 3))
    assert hd95(a, a, ANISO) == 0.0
    assert average_surface_distance(a, a, ANISO) == 0.0


def test_2d_lines_anisotropic():
    # (rows = y, cols = x), spacing x = 0.5, y = 2.
    grid = Grid((10, 10), spacing=(0.5, 2.0))
    pred = torch.zeros(grid.shape, dtype=torch.uint8)
    pred[2, 2:6] = 1  # a 1-pixel-thick line is all surface
    # 3 rows apart: every point is 3·2 = 6 from its partner.
    target = torch.zeros_like(pred)
    target[5, 2:6] = 1
    _close(hd95(pred, target, grid), 6.0)
    _close(average_surface_distance(pred, target, grid), 6.0)
    # 2 columns apart: directed distances (sorted) 0, 0, 0.5, 1 both ways; 95th percentile by
    # linear interpolation at position 0.95·3 = 2.85 -> 0.5 + 0.85·0.5.
    target = torch.zeros_like(pred)
    target[2, 4:8] = 1
    _close(hd95(pred, target, grid), 0.925)
    _close(hausdorff_distance(pred, target, grid), 1.0)
    _close(average_surface_distance(pred, target, grid), 0.375)


def test_hd_takes_max_of_directed_percentiles_and_asd_pools():
    # MONAI convention check: a point on a 10-pixel line. pred->target = [0];
    # target->pred = [0..9]. Max of directed 95th percentiles = 0.95·9 = 8.55 (pooling the
    # 11 distances would give 8.5). Pooled ASD = 45 / 11.
    grid = Grid((11, 12))
    target = torch.zeros(grid.shape, dtype=torch.int64)
    target[5, 0:10] = 1
    pred = torch.zeros_like(target)
    pred[5, 0] = 1
    _close(hd95(pred, target, grid), 8.55)
    _close(hd95(target, pred, grid), 8.55)
    _close(hausdorff_distance(pred, target, grid, percentile=50), 4.5)
    _close(average_surface_distance(pred, target, grid), 45 / 11)


def test_empty_mask_gives_nan():
    empty = torch.zeros(ANISO.shape, dtype=torch.bool)
    box = _box((2, 2, 2))
    for pred, target in ((empty, box), (box, empty), (empty, empty)):
        with pytest.warns(RuntimeWarning, match="empty"):
            assert math.isnan(hd95(pred, target, ANISO))
        with pytest.warns(RuntimeWarning, match="empty"):
            assert math.isnan(average_surface_distance(pred, target, ANISO))
        ab, ba = surface_distances(pred, target, ANISO)
        assert ab.numel() == 0 and ba.numel() == 0


def test_surface_metrics_check_grid_shape_and_percentile():
    box = _box((2, 2, 2))
    with pytest.raises(FmregError, match="grid has shape"):
        hd95(box[:5], box[:5], ANISO)
    with pytest.raises(FmregError, match="percentile"):
        hausdorff_distance(box, box, ANISO, percentile=101)


# ------------------------------------------------------------------------------ TRE
def test_landmark_tre_in_point_units_and_from_voxels():
    mapped = torch.tensor([[1.0, 2.0], [4.0, 6.0]])
    moving = torch.tensor([[1.0, 2.0], [1.0, 2.0]])
    _close(landmark_tre(mapped, moving), [0.0, 5.0])
    # Voxel-index points on a grid with spacing x=2, y=3: (3, 4) voxels = (6, 12) mm.
    grid = Grid((20, 20), spacing=(2.0, 3.0), direction=(0.0, -1.0, 1.0, 0.0))
    _close(landmark_tre(mapped, moving, grid, Frame.VOXEL), [0.0, math.sqrt(36 + 144)])
    out = landmark_tre(mapped, moving, grid)  # physical points: no conversion
    assert out.dtype == torch.float64
    _close(out, [0.0, 5.0])


def test_landmark_tre_errors():
    a = torch.zeros(3, 3)
    with pytest.raises(FmregError, match="shape"):
        landmark_tre(a, torch.zeros(4, 3))
    with pytest.raises(FmregError, match=r"\(N, 2\) or \(N, 3\)"):
        landmark_tre(torch.zeros(3, 4), torch.zeros(3, 4))
    with pytest.raises(FmregError, match="3D landmarks cannot be measured on a 2D grid"):
        landmark_tre(a, a, Grid((4, 4)))


CENTROID_GRID = Grid((6, 8, 10), spacing=(0.5, 2.0, 5.0), origin=(10.0, -20.0, 30.0),
                     direction=ROTATION)


def _centroid_maps() -> tuple[torch.Tensor, torch.Tensor]:
    fixed = torch.zeros(CENTROID_GRID.shape, dtype=torch.int16)
    warped = torch.zeros_like(fixed)
    fixed[1:3, 2:5, 3:7] = 4
    warped[2:4, 4:7, 0:4] = 4  # shifted by dz=+1, dy=+2, dx=-3 voxels
    fixed[3:6, 0:3, 6:9] = 7  # 3×3×3 block centred at (4, 1, 7) ...
    warped[4, 1, 7] = 7  # ... and its centre voxel: same centroid
    return warped, fixed


def test_centroid_tre_shift_on_rotated_anisotropic_grid():
    warped, fixed = _centroid_maps()
    with pytest.warns(RuntimeWarning, match="label 9"):
        out = centroid_tre(warped, fixed, CENTROID_GRID, [4, 7, 9])
    # |(-3·0.5, 2·2, 1·5)| mm; the rotation does not change the length.
    _close(out[4], math.sqrt(1.5**2 + 4.0**2 + 5.0**2))
    _close(out[7], 0.0)
    _close(out[9], NAN)


def test_centroid_tre_matches_simpleitk_geometry():
    warped, fixed = _centroid_maps()
    img = sitk.Image(list(CENTROID_GRID.size), sitk.sitkUInt8)
    img.SetSpacing(CENTROID_GRID.spacing)
    img.SetOrigin(CENTROID_GRID.origin)
    img.SetDirection(CENTROID_GRID.direction)

    def world_centroid(m):
        idx = torch.nonzero(m).double().mean(0).flip(0).tolist()  # (x, y, z) index
        return np.array(img.TransformContinuousIndexToPhysicalPoint(idx))

    expected = np.linalg.norm(world_centroid(warped == 4) - world_centroid(fixed == 4))
    _close(centroid_tre(warped, fixed, CENTROID_GRID, [4])[4], expected)


# ------------------------------------------------------------------------------ Jacobian
def test_folding_percent():
    _close(folding_percent(torch.tensor([[1.0, 0.5], [0.0, -1.0]])), 50.0)
    _close(folding_percent(torch.ones(3, 4, 5)), 0.0)
    with pytest.raises(FmregError, match="empty"):
        folding_percent(torch.zeros(0))


def test_std_log_jacobian():
    e = math.e
    # log = (1, -1): population std 1.
    _close(std_log_jacobian(torch.tensor([e, 1 / e])), 1.0)
    _close(std_log_jacobian(torch.ones(4, 4)), 0.0)
    # det 0 is clamped to 1e-9: log = (0, log 1e-9), std = |log 1e-9| / 2.
    _close(std_log_jacobian(torch.tensor([1.0, 0.0])), -math.log(1e-9) / 2)
    _close(std_log_jacobian(torch.tensor([1.0, -5.0])), -math.log(1e-9) / 2)
    _close(std_log_jacobian(torch.tensor([1.0, 0.0]), eps=1e-3), -math.log(1e-3) / 2)


def _brute_force_directed(a: np.ndarray, b: np.ndarray, spacing_array) -> np.ndarray:
    from scipy import ndimage

    sa = a & ~ndimage.binary_erosion(a)
    sb = b & ~ndimage.binary_erosion(b)
    pa = np.argwhere(sa) * np.asarray(spacing_array)
    pb = np.argwhere(sb) * np.asarray(spacing_array)
    return np.sqrt(((pa[:, None, :] - pb[None, :, :]) ** 2).sum(-1)).min(1)


def test_surface_distances_match_brute_force_on_blobs_touching_the_border():
    # Irregular masks, one reaching the array border: checks the bounding-box crop and the EDT
    # against all-pairs distances on the full array.
    gen = torch.Generator().manual_seed(0)
    grid = Grid((9, 11, 13), spacing=(0.7, 1.3, 4.0))
    noise = torch.rand(grid.shape, generator=gen)
    a = torch.zeros(grid.shape, dtype=torch.bool)
    b = torch.zeros(grid.shape, dtype=torch.bool)
    a[0:5, 0:7, 2:9] = noise[0:5, 0:7, 2:9] > 0.2
    b[3:8, 4:10, 5:12] = noise[3:8, 4:10, 5:12] > 0.3
    ab, ba = surface_distances(a, b, grid)
    _close(ab, _brute_force_directed(a.numpy(), b.numpy(), grid.spacing_array))
    _close(ba, _brute_force_directed(b.numpy(), a.numpy(), grid.spacing_array))
