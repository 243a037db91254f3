"""``fmreg known-pairs``: benchmark pairs with known transforms, scored by ``fmreg bench``."""

from __future__ import annotations

import csv

import numpy as np
import pytest
import torch

from fmreg.cli import main
from fmreg.core.grid import Frame, Grid
from fmreg.core.image import Image
from fmreg.core.sampling import sample
from fmreg.io.fields import read_field
from fmreg.io.images import read_image, write_image
from fmreg.io.manifest import read_landmarks


@pytest.fixture()
def source(tmp_path):
    y, x = torch.meshgrid(torch.arange(80.0), torch.arange(96.0), indexing="ij")
    path = tmp_path / "src" / "texture.nii.gz"
    path.parent.mkdir()
    write_image(Image(torch.sin(x / 6) * torch.cos(y / 5) + 0.01 * x, Grid((80, 96), (1.0, 1.0))), path)
    return path


def test_the_moving_landmarks_are_the_true_field_applied_to_the_fixed_ones(source, tmp_path, capsys):
    out = tmp_path / "known"
    assert main(["known-pairs", str(source), "-o", str(out), "--seeds", "4", "-q"]) == 0
    rows = list(csv.DictReader((out / "pairs.csv").open()))
    assert [r["name"] for r in rows] == ["texture_s4"]
    p = read_landmarks(out / rows[0]["fixed_landmarks"])
    q = read_landmarks(out / rows[0]["moving_landmarks"])
    assert p.shape == q.shape and len(p) >= 50
    truth = read_field(out / "texture_s4_true_ddf.nii.gz")
    fixed = read_image(out / rows[0]["fixed"])
    moving = read_image(out / rows[0]["moving"])
    p_mm = fixed.grid.convert_points(p, Frame.VOXEL, Frame.PHYSICAL)
    u = sample(truth.to(Frame.PHYSICAL).data, truth.grid, p_mm.T.contiguous(), mode="linear", fill=None).T
    expected = moving.grid.convert_points(p_mm + u.double(), Frame.PHYSICAL, Frame.VOXEL)
    torch.testing.assert_close(q, expected, atol=1e-3, rtol=0)
    # Every moving landmark lies at least a pixel inside the moving image.
    assert bool(((q >= 1) & (q <= torch.tensor(moving.grid.size, dtype=q.dtype) - 2)).all())


def test_through_an_aperture_both_images_keep_one_disc_and_the_landmarks_lie_in_both(source, tmp_path, capsys):
    from fmreg.app.known_pairs import aperture_mask

    out = tmp_path / "known"
    assert main(["known-pairs", str(source), "-o", str(out), "--seeds", "3", "--aperture", "0.45", "-q"]) == 0
    fixed, moving = read_image(out / "texture_s3_fixed.nii.gz"), read_image(out / "texture_s3_moving.nii.gz")
    fill = min(float(fixed.data.min()), float(moving.data.min()))
    for image in (fixed, moving):
        disc = aperture_mask(image.grid, 0.45)
        assert bool((image.data[~disc] == fill).all()) and bool((image.data[disc] > fill).any())
    p = read_landmarks(out / "texture_s3_fixed_landmarks.csv").numpy()
    q = read_landmarks(out / "texture_s3_moving_landmarks.csv").numpy()
    assert len(p) >= 10
    for points, image in ((p, fixed), (q, moving)):
        centre = (np.asarray(image.grid.size) - 1) / 2
        assert (np.linalg.norm(points - centre, axis=1) <= 0.45 * min(image.grid.size) - 1.0).all()


def test_bench_scores_the_identity_at_the_landmarks_displacement(source, tmp_path, capsys):
    out = tmp_path / "known"
    assert main(["known-pairs", str(source), "-o", str(out), "--seeds", "1", "2", "-q"]) == 0
    assert main(["bench", str(out / "pairs.csv"), "-m", "identity", "-o", str(tmp_path / "bench"), "-q"]) == 0
    rows = {r["name"]: r for r in csv.DictReader((tmp_path / "bench" / "results.csv").open())}
    for name in ("texture_s1", "texture_s2"):
        p = read_landmarks(out / f"{name}_fixed_landmarks.csv")
        q = read_landmarks(out / f"{name}_moving_landmarks.csv")
        assert float(rows[name]["tre_mean"]) == pytest.approx(float((p - q).norm(dim=1).mean()), rel=1e-4)


@pytest.mark.parametrize("args, message", [
    (["--seeds", "1", "1"], "seeds must be distinct"),
    (["--local-mm", "nan"], "local_mm must be a finite number"),
    (["--aperture", "0.7"], "aperture must be in (0, 0.5]"),
    (["--aperture", "0"], "aperture must be in (0, 0.5]"),
    (["--max-shift", "0.6"], "max_shift must be in [0, 0.5]"),
    (["--max-angle", "nan"], "max_angle in [0, 180]"),
    (["--scale", "1.1", "0.9"], "scale range must be 0 < low <= high"),
])
def test_bad_settings_are_one_line_errors_and_write_nothing(source, tmp_path, capsys, args, message):
    out = tmp_path / "known"
    assert main(["known-pairs", str(source), "-o", str(out), *args]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err
    assert not out.exists()


def test_a_3d_source_is_refused_and_nothing_is_left(tmp_path, capsys):
    path = tmp_path / "vol.nii.gz"
    write_image(Image(torch.rand(6, 20, 20), Grid((6, 20, 20))), path)
    out = tmp_path / "known"
    assert main(["known-pairs", str(path), "-o", str(out)]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "2D" in err
    assert not out.exists() or not any(out.iterdir())
    np.testing.assert_array_equal(read_image(path).data.shape, (6, 20, 20))


def test_a_constant_source_is_refused_and_nothing_is_left(tmp_path, capsys):
    path = tmp_path / "flat.nii.gz"
    write_image(Image(torch.full((40, 40), 3.0), Grid((40, 40))), path)
    out = tmp_path / "known"
    assert main(["known-pairs", str(path), "-o", str(out)]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no contrast" in err
    assert not out.exists() or not any(out.iterdir())


def test_move_bounds_bound_the_true_similarity(source, tmp_path):
    from fmreg.io.fields import read_field

    out = tmp_path / "known"
    args = ["--max-shift", "0", "--max-angle", "0", "--scale", "1", "1", "--local-mm", "0", "--seeds", "5", "-q"]
    assert main(["known-pairs", str(source), "-o", str(out), *args]) == 0
    # No shift, turn, scale or local field: the moving image is the crop of the very points of the fixed one.
    truth = read_field(out / "texture_s5_true_ddf.nii.gz")
    assert float(truth.data.abs().max()) < 1e-4


def test_the_help_names_the_default_bounds_the_generator_uses(capsys):
    from fmreg.evaluate.known_transforms import MAX_ANGLE_DEG, MAX_SHIFT_FRAC, SCALE_RANGE

    with pytest.raises(SystemExit):
        main(["known-pairs", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert f"(default {MAX_SHIFT_FRAC:g})" in text and f"degrees (default {MAX_ANGLE_DEG:g})" in text
    assert f"(default {SCALE_RANGE[0]:g} {SCALE_RANGE[1]:g})" in text
