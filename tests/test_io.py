"""Reading and writing with geometry: real ACDC headers, pictures, NumPy, bad files."""

from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from PIL import Image as PILImage

from fmreg.errors import FmregError
from fmreg.core.grid import Grid
from fmreg.core.image import Image
from fmreg.io.images import read_image, write_image

ACDC = Path(__file__).resolve().parents[2] / "shared" / "data" / "acdc" / "patient068"


@pytest.mark.skipif(not ACDC.is_dir(), reason="shared data not available")
def test_acdc_spacing_comes_from_the_header_not_the_unit_sform():
    img = read_image(ACDC / "patient068_frame01.nii.gz")
    assert img.grid.shape == (7, 208, 256)
    torch.testing.assert_close(torch.tensor(img.grid.spacing, dtype=torch.float64), torch.tensor([1.5625, 1.5625, 10.0], dtype=torch.float64))
    labels = read_image(ACDC / "patient068_frame01_gt.nii.gz", is_label=True)
    assert labels.data.dtype == torch.int64
    assert set(np.unique(labels.data.numpy()).tolist()) == {0, 1, 2, 3}
    assert labels.grid.same_as(img.grid)


def test_rgb_picture_is_read_as_luminance_on_a_unit_grid(tmp_path):
    rgb = np.zeros((3, 4, 3), np.uint8)
    rgb[..., 0] = 100  # pure red 100 → ITU-R 601 luma 0.299 · 100
    PILImage.fromarray(rgb).save(tmp_path / "x.png")
    img = read_image(tmp_path / "x.png")
    assert img.grid == Grid((3, 4))
    torch.testing.assert_close(img.data, torch.full((3, 4), 30.0))  # PIL rounds 29.9


def test_npz_keeps_its_geometry_and_round_trips(tmp_path):
    grid = Grid((3, 4, 5), spacing=(0.5, 1.0, 4.0), origin=(1.0, 2.0, 3.0))
    img = Image(torch.rand(3, 4, 5), grid)
    path = write_image(img, tmp_path / "a.npz")
    back = read_image(path)
    assert back.grid.same_as(grid)
    torch.testing.assert_close(back.data, img.data)


def test_nifti_round_trip_keeps_oblique_geometry_and_label_values(tmp_path):
    c, s = np.cos(0.3), np.sin(0.3)
    grid = Grid((2, 3, 4), spacing=(1.5, 1.5, 10.0), origin=(-5.0, 7.0, 1.0), direction=(c, -s, 0, s, c, 0, 0, 0, 1))
    labels = Image(torch.tensor([0, 3, 1000, 7] * 6).reshape(2, 3, 4), grid)
    path = write_image(labels, tmp_path / "l.nii.gz")
    back = read_image(path, is_label=True)
    assert back.grid.same_as(grid)
    assert torch.equal(back.data, labels.data)
    assert [p.name for p in tmp_path.iterdir()] == ["l.nii.gz"]  # no temporary file left


def test_nan_in_nifti_is_refused_although_itk_reads_it_as_zero(tmp_path):
    arr = np.ones((3, 4, 5), np.float32)
    arr[1, 2, 3] = np.nan
    sitk.WriteImage(sitk.GetImageFromArray(arr), str(tmp_path / "nan.nii.gz"))
    assert float(sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "nan.nii.gz")))[1, 2, 3]) == 0.0
    with pytest.raises(FmregError, match="1 NaN/Inf"):
        read_image(tmp_path / "nan.nii.gz")


@pytest.mark.parametrize("content", [b"", b"not an image at all"])
def test_unreadable_files_give_one_line_errors(tmp_path, content):
    bad = tmp_path / "bad.nii.gz"
    bad.write_bytes(content)
    with pytest.raises(FmregError, match="cannot read") as err:
        read_image(bad)
    assert "\n" not in str(err.value)
    with pytest.raises(FmregError, match="file not found"):
        read_image(tmp_path / "missing.png")


def test_label_map_with_fractional_values_is_refused(tmp_path):
    sitk.WriteImage(sitk.GetImageFromArray(np.full((2, 3, 4), 0.5, np.float32)), str(tmp_path / "f.nii.gz"))
    with pytest.raises(FmregError, match="non-integer"):
        read_image(tmp_path / "f.nii.gz", is_label=True)


def test_label_maps_are_read_as_typed_label_maps_and_warp_by_nearest(tmp_path):
    from fmreg.core.image import LabelMap
    from fmreg.io.images import read_image, write_image
    from fmreg.transforms.displacement import DisplacementField
    from fmreg.transforms.warp import warp

    grid = Grid((4, 5), (1.0, 1.0))
    labels = torch.tensor([[0, 1, 1, 2, 2]] * 4)
    path = write_image(Image(labels, grid), tmp_path / "l.nii.gz")
    lab = read_image(path, is_label=True)
    assert isinstance(lab, LabelMap) and lab.data.dtype == torch.int64
    assert not isinstance(read_image(path), LabelMap)
    # Half a voxel along x: a label map takes a neighbour's value, never 1.5.
    field = DisplacementField(torch.stack([torch.full((4, 5), 0.4), torch.zeros(4, 5)]), grid)
    warped = warp(lab, field)
    assert isinstance(warped, LabelMap) and set(warped.data.unique().tolist()) <= {0, 1, 2}
    with pytest.raises(FmregError, match="integer"):
        LabelMap(torch.zeros(4, 5), grid)
