"""Peer baselines (demons, elastix, ANTs): they register, and their fields follow fmreg's convention.

The phantoms are analytic blob images sampled at world points, so a moving image is the fixed
one shifted by a known ``s`` (mm) on any grid: ``moving(y) = g(y - s)``, hence
``moving(x + s) = fixed(x)`` and the true fixed→moving displacement is ``u = s`` everywhere.
Grids are oblique and the moving grid differs from the fixed one, so any slip in spacing,
origin, direction or component order shows up.

elastix and ANTs need the optional ``fmreg[peers]`` extra; their tests are skipped without it.
"""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch

from fmreg.errors import FmregError, MissingExtraError
from fmreg.transforms.displacement import DisplacementField
from fmreg.transforms.warp import warp
from fmreg.core.grid import Frame, Grid
from fmreg.core.image import Image
from fmreg.methods import available_methods, get_method

# ---------------------------------------------------------------------------- phantoms


def _rotation(angle_deg: float, ndim: int) -> tuple[float, ...]:
    a = np.deg2rad(angle_deg)
    r = np.eye(ndim)
    r[:2, :2] = [[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]]
    return tuple(r.ravel())


def _centre(grid: Grid) -> np.ndarray:
    """World position of the centre of the grid's field of view."""
    idx = (np.asarray(grid.size, dtype=np.float64) - 1) / 2
    return grid.index_to_world_matrix()[: grid.ndim] @ np.append(idx, 1.0)


def _blobs(grid: Grid, centre: np.ndarray, shift: np.ndarray) -> Image:
    """Smooth asymmetric blobs on a gentle texture, ``g(y - shift)`` sampled on ``grid``."""
    pts = grid.coordinates(Frame.PHYSICAL, dtype=torch.float64).numpy()
    pts = pts - (centre + shift).reshape(-1, *([1] * grid.ndim))
    x, y = pts[0], pts[1]
    z = pts[2] if grid.ndim == 3 else 0.0
    offsets = [(-6.0, -4.0), (5.0, -3.0), (1.0, 6.0), (-3.0, 3.5), (9.0, 7.0), (-10.0, 8.0)]
    sigmas = [4.0, 3.0, 3.5, 2.5, 3.0, 4.0]
    weights = [1.0, 0.8, 0.6, 0.9, 0.7, 0.5]
    out = 0.25 * (1.0 + np.sin(0.21 * x + 0.4) * np.cos(0.17 * y - 0.3))  # texture: no flat background
    for (ox, oy), sig, w in zip(offsets, sigmas, weights):
        d2 = (x - ox) ** 2 + (y - oy) ** 2 + (z / 3.0) ** 2  # long along z, like a cardiac stack
        out = out + w * np.exp(-d2 / (2 * sig**2))
    return Image(torch.from_numpy((100.0 * out).astype(np.float32)), grid)


def _grid_around(centre: np.ndarray, shape, spacing, direction, offset) -> Grid:
    """A grid whose field of view is centred on ``centre + offset`` (world mm)."""
    ndim = len(shape)
    m = np.asarray(direction).reshape(ndim, ndim) @ np.diag(spacing)
    half = (np.asarray(list(reversed(shape)), dtype=np.float64) - 1) / 2
    origin = np.asarray(centre) + np.asarray(offset) - m @ half
    return Grid(shape, spacing, tuple(origin), direction)


def _pair_2d():
    fixed_grid = Grid((48, 52), spacing=(1.0, 1.1), origin=(-20.0, -25.0), direction=_rotation(12, 2))
    centre = _centre(fixed_grid)
    # The moving grid differs in size, spacing, origin and direction, and covers the fixed one.
    moving_grid = _grid_around(centre, (66, 64), (1.05, 1.0), _rotation(-8, 2), (1.0, -0.5))
    shift = np.array([2.0, -1.5])
    return _blobs(fixed_grid, centre, np.zeros(2)), _blobs(moving_grid, centre, shift), shift


def _pair_3d():
    # Anisotropic like ACDC (fine in-plane, 8 slices 4 mm apart), slightly oblique.
    fixed_grid = Grid((8, 40, 44), spacing=(1.2, 1.2, 4.0), origin=(-25.0, -22.0, -14.0), direction=_rotation(10, 3))
    centre = _centre(fixed_grid)
    moving_grid = _grid_around(centre, (10, 50, 50), (1.25, 1.2, 4.0), _rotation(5, 3), (0.5, -0.5, 1.0))
    shift = np.array([2.0, -1.5, 0.0])
    return _blobs(fixed_grid, centre, np.zeros(3)), _blobs(moving_grid, centre, shift), shift


def _mse(a: torch.Tensor, b: torch.Tensor, margin: int = 6) -> float:
    """Mean squared difference away from the in-plane borders (where fill values differ)."""
    crop = (Ellipsis, slice(margin, -margin), slice(margin, -margin))
    return float(((a[crop].double() - b[crop].double()) ** 2).mean())


def _check_recovers_shift(field, fixed: Image, moving: Image, shift: np.ndarray, atol_mm: float, ratio: float):
    assert isinstance(field, DisplacementField)
    assert field.frame == Frame.PHYSICAL
    assert field.grid.same_as(fixed.grid)
    assert tuple(field.data.shape) == (fixed.ndim, *fixed.grid.shape)
    assert torch.isfinite(field.data).all()
    before = _mse(warp(moving, DisplacementField.identity(fixed.grid)).data, fixed.data)
    after = _mse(warp(moving, field).data, fixed.data)
    assert after < ratio * before, (after, before)
    # Displacement near the centre of the field of view: the known shift (x, y[, z]) in mm.
    centre = tuple(s // 2 for s in fixed.grid.shape)
    window = tuple(slice(max(c - 2, 0), c + 3) for c in centre)
    u = field.data[(slice(None), *window)].reshape(fixed.ndim, -1).mean(dim=1).double().numpy()
    np.testing.assert_allclose(u, shift, atol=atol_mm)


# ---------------------------------------------------------------------------- registry


def test_peers_are_registered():
    names = available_methods()
    for name in ("demons", "elastix", "ants"):
        assert name in names
    for name in ("demons", "elastix", "ants"):
        method = get_method(name)
        assert method.name == name
        assert method.uses_labels is False


@pytest.mark.parametrize("name,module", [("elastix", "itk"), ("ants", "ants")])
def test_missing_extra_names_it(monkeypatch, name, module):
    # A None entry in sys.modules makes `import module` raise ImportError, as if not installed.
    monkeypatch.setitem(sys.modules, module, None)
    fixed, moving, _ = _pair_2d()
    with pytest.raises(MissingExtraError) as info:
        get_method(name).register(fixed, moving)
    message = str(info.value)
    assert "fmreg[peers]" in message and "\n" not in message


# ---------------------------------------------------------------------------- demons


def test_demons_shrink_factors_keep_the_slice_axis():
    from fmreg.methods.peers.demons import axis_shrink_factors

    acdc = Grid((7, 208, 256), spacing=(1.5625, 1.5625, 10.0))
    assert axis_shrink_factors(acdc, 4) == (4, 4, 1)
    assert axis_shrink_factors(acdc, 2) == (2, 2, 1)
    assert axis_shrink_factors(acdc, 1) == (1, 1, 1)
    iso = Grid((64, 64), spacing=(1.0, 1.0))
    assert axis_shrink_factors(iso, 4) == (4, 4)
    tiny = Grid((12, 20), spacing=(1.0, 1.0))  # never below 8 voxels on an axis
    assert axis_shrink_factors(tiny, 4) == (2, 1)


def test_demons_2d_recovers_shift():
    fixed, moving, shift = _pair_2d()
    result = get_method("demons").register(fixed, moving)
    assert result.method == "demons"
    assert result.parameters["shrink_factors"] == [4, 2, 1]
    assert result.info == {}
    _check_recovers_shift(result.field, fixed, moving, shift, atol_mm=0.3, ratio=0.02)


def test_demons_3d_anisotropic_recovers_shift():
    fixed, moving, shift = _pair_3d()
    result = get_method("demons").register(fixed, moving)
    _check_recovers_shift(result.field, fixed, moving, shift, atol_mm=0.4, ratio=0.05)


def test_demons_field_is_what_sitk_warps_with():
    """The field warps the moving image the way SimpleITK's own resampler does."""
    import SimpleITK as sitk

    from fmreg.io.images import to_sitk

    fixed, moving, _ = _pair_2d()
    field = get_method("demons", iterations=(20, 10, 5)).register(fixed, moving).field
    ddf = sitk.GetImageFromArray(np.moveaxis(field.data.double().numpy(), 0, -1), isVector=True)
    ddf.CopyInformation(to_sitk(fixed))
    tx = sitk.DisplacementFieldTransform(ddf)
    theirs = sitk.Resample(to_sitk(moving), to_sitk(fixed), tx, sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    theirs = torch.from_numpy(sitk.GetArrayFromImage(theirs))
    torch.testing.assert_close(warp(moving, field).data, theirs, atol=0.05, rtol=1e-3)


# ---------------------------------------------------------------------------- elastix


def test_elastix_geometry_round_trip():
    pytest.importorskip("itk")
    from fmreg.methods.peers.elastix import grid_of_itk, to_itk

    fixed, _, _ = _pair_3d()
    img = to_itk(fixed)
    assert grid_of_itk(img).same_as(fixed.grid, atol=1e-9)
    import itk

    np.testing.assert_array_equal(itk.array_from_image(img), fixed.data.numpy())


@pytest.mark.slow
def test_elastix_2d_recovers_shift_and_matches_transformix(tmp_path, monkeypatch):
    itk = pytest.importorskip("itk")
    from fmreg.methods.peers.elastix import ElastixMethod, field_from_transform

    monkeypatch.chdir(tmp_path)  # whatever elastix writes to the working directory shows up here
    fixed, moving, shift = _pair_2d()
    method = ElastixMethod()
    transform, _, moving_itk = method.register_itk(fixed, moving)
    field = field_from_transform(transform, moving_itk, fixed.grid)
    _check_recovers_shift(field, fixed, moving, shift, atol_mm=0.3, ratio=0.05)

    # elastix's own resampler (transformix, linear interpolation) gives the same warped image.
    for i in range(transform.GetNumberOfParameterMaps()):
        transform.SetParameter(i, "ResampleInterpolator", "FinalLinearInterpolator")
    transformix = itk.TransformixFilter.New(moving_itk)
    transformix.SetTransformParameterObject(transform)
    transformix.SetOutputDirectory(str(tmp_path / "transformix"))
    (tmp_path / "transformix").mkdir()
    transformix.SetLogToConsole(False)
    transformix.UpdateLargestPossibleRegion()
    theirs = torch.from_numpy(np.asarray(itk.array_from_image(transformix.GetOutput()), dtype=np.float32))
    torch.testing.assert_close(warp(moving, field).data, theirs, atol=0.05, rtol=1e-3)
    # fmreg's own runs leave nothing behind in the working directory.
    assert [p.name for p in tmp_path.iterdir()] == ["transformix"]


@pytest.mark.slow
def test_elastix_3d_anisotropic_recovers_shift():
    pytest.importorskip("itk")
    fixed, moving, shift = _pair_3d()
    # Fewer iterations than elastix's default 256 per level keep the test quick.
    result = get_method("elastix", overrides={"MaximumNumberOfIterations": 64}).register(fixed, moving)
    assert result.method == "elastix" and result.parameters["maps"] == ["affine", "bspline"]
    assert result.parameters["overrides"] == {"MaximumNumberOfIterations": 64}
    assert result.info == {}
    _check_recovers_shift(result.field, fixed, moving, shift, atol_mm=0.5, ratio=0.1)


# ---------------------------------------------------------------------------- ANTs


def test_ants_geometry_round_trip():
    pytest.importorskip("ants")
    from fmreg.methods.peers.ants import grid_of_ants, to_ants

    fixed, _, _ = _pair_3d()
    img = to_ants(fixed)
    assert grid_of_ants(img).same_as(fixed.grid, atol=1e-9)
    np.testing.assert_array_equal(img.numpy().T, fixed.data.numpy())


@pytest.mark.slow
def test_ants_2d_recovers_shift_and_matches_apply_transforms(tmp_path):
    ants = pytest.importorskip("ants")
    from fmreg.methods.peers.ants import AntsMethod, field_from_transforms

    fixed, moving, shift = _pair_2d()
    method = AntsMethod(random_seed=1)
    fixed_ants, moving_ants, reg = method.register_ants(fixed, moving, tmp_path)
    field = field_from_transforms(ants, fixed_ants, moving_ants, reg["fwdtransforms"], fixed.grid, tmp_path)
    result = method.register(fixed, moving)
    assert result.method == "ants" and result.parameters["type_of_transform"] == "SyN"
    _check_recovers_shift(result.field, fixed, moving, shift, atol_mm=0.5, ratio=0.1)

    # ANTs' own resampler gives the same warped image.
    theirs = ants.apply_transforms(fixed_ants, moving_ants, reg["fwdtransforms"], interpolator="linear")
    theirs = torch.from_numpy(np.ascontiguousarray(theirs.numpy().T)).float()
    torch.testing.assert_close(warp(moving, field).data, theirs, atol=0.05, rtol=1e-3)


@pytest.mark.slow
def test_ants_3d_anisotropic_recovers_shift():
    pytest.importorskip("ants")
    fixed, moving, shift = _pair_3d()
    result = get_method("ants", random_seed=1).register(fixed, moving)
    _check_recovers_shift(result.field, fixed, moving, shift, atol_mm=0.5, ratio=0.1)


@pytest.mark.parametrize(
    "name, params, message",
    [
        ("demons", {"iterations": "abc"}, "parameter iterations must be a list of integers or an integer, got 'abc'"),
        ("demons", {"field_sigma": True}, "parameter field_sigma must be a number, got True"),
        ("ants", {"random_seed": 1.5}, "parameter random_seed must be an integer or null, got 1.5"),
    ],
)
def test_peer_parameters_of_the_wrong_type_are_user_errors_that_name_them(name, params, message):
    with pytest.raises(FmregError) as info:
        get_method(name, **params)
    assert str(info.value) == message


def test_peer_parameters_of_the_right_type_pass():
    assert get_method("demons", iterations=[10, 5, 2], field_sigma=2).iterations == (10, 5, 2)
