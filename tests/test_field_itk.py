"""fmreg's warp agrees with SimpleITK's Resample through the exported ddf.nii.gz."""

import numpy as np
import SimpleITK as sitk
import torch

from fmreg.transforms.displacement import DisplacementField

from fmreg.transforms.warp import warp
from fmreg.core.grid import Frame, Grid
from fmreg.core.image import Image
from fmreg.io.fields import read_field, write_field
from fmreg.io.images import to_sitk


def _rotation(angle_deg: float, ndim: int) -> tuple[float, ...]:
    a = np.deg2rad(angle_deg)
    r = np.eye(ndim)
    r[:2, :2] = [[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]]
    if ndim == 3:  # tilt too so that no axis stays aligned with the world
        b = np.deg2rad(20)
        rx = np.array([[1, 0, 0], [0, np.cos(b), -np.sin(b)], [0, np.sin(b), np.cos(b)]])
        r = rx @ r
    return tuple(r.ravel())


def _smooth_field(grid: Grid, amplitude: float, seed: int = 0) -> DisplacementField:
    g = torch.Generator().manual_seed(seed)
    coarse = torch.randn((grid.ndim, *[3] * grid.ndim), generator=g, dtype=torch.float64)
    mode = "trilinear" if grid.ndim == 3 else "bilinear"
    data = torch.nn.functional.interpolate(coarse[None], size=grid.shape, mode=mode, align_corners=True)[0]
    return DisplacementField((amplitude * data).float(), grid, Frame.PHYSICAL)


def _itk_resample(moving: Image, fixed_grid: Grid, ddf_path) -> np.ndarray:
    tx = sitk.DisplacementFieldTransform(sitk.ReadImage(str(ddf_path), sitk.sitkVectorFloat64))
    ref = to_sitk(np.zeros(fixed_grid.shape, np.float32), fixed_grid)
    out = sitk.Resample(to_sitk(moving), ref, tx, sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    return sitk.GetArrayFromImage(out)


def _check(grid: Grid, moving_grid: Grid, tmp_path, amplitude: float) -> None:
    g = torch.Generator().manual_seed(1)
    moving = Image(torch.rand(moving_grid.shape, generator=g) * 100, moving_grid)
    field = _smooth_field(grid, amplitude)
    ours = warp(moving, field).data
    path = write_field(field, tmp_path / "ddf.nii.gz")
    theirs = torch.from_numpy(_itk_resample(moving, grid, path))
    torch.testing.assert_close(ours, theirs, atol=1e-3, rtol=1e-4)
    back = read_field(path)
    torch.testing.assert_close(back.data, field.data)
    assert back.grid.same_as(grid)


def test_sitk_resample_matches_warp_3d_anisotropic_oblique(tmp_path):
    fixed = Grid((7, 20, 16), spacing=(1.5, 1.2, 10.0), origin=(-12.0, 4.0, 30.0), direction=_rotation(30, 3))
    moving = Grid((8, 18, 17), spacing=(1.4, 1.3, 9.0), origin=(-10.0, 2.0, 28.0), direction=_rotation(25, 3))
    _check(fixed, moving, tmp_path, amplitude=4.0)


def test_sitk_resample_matches_warp_2d(tmp_path):
    fixed = Grid((24, 30), spacing=(0.8, 1.1), origin=(3.0, -2.0), direction=_rotation(15, 2))
    _check(fixed, fixed, tmp_path, amplitude=3.0)


def test_voxel_physical_round_trip_anisotropic():
    grid = Grid((5, 6, 7), spacing=(1.5, 2.0, 10.0), origin=(1.0, 2.0, 3.0), direction=_rotation(40, 3))
    field = _smooth_field(grid, 5.0)
    for frame in (Frame.VOXEL, Frame.NORMALIZED):
        torch.testing.assert_close(field.to(frame).to(Frame.PHYSICAL).data, field.data, atol=1e-5, rtol=1e-5)
    # A 10 mm shift along world z is one voxel along index z when the direction is identity.
    g = Grid((5, 6, 7), spacing=(1.5, 2.0, 10.0))
    u = torch.zeros((3, 5, 6, 7))
    u[2] = 10.0
    vox = DisplacementField(u, g).to(Frame.VOXEL).data
    torch.testing.assert_close(vox[2], torch.ones(5, 6, 7))
    torch.testing.assert_close(vox[:2], torch.zeros(2, 5, 6, 7))
