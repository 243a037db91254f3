"""Issue 12, item 2: images without contrast are refused before any work; results that cannot be
trusted say so (stderr and ``result.json``'s ``warnings``)."""

from __future__ import annotations

import csv
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from fmreg.cli import main
from fmreg.core.grid import Grid
from fmreg.core.image import Image, check_contrast
from fmreg.errors import FmregError
from fmreg.evaluate.trust import trust_warnings
from fmreg.io.images import read_image, write_image
from fmreg.transforms.displacement import DisplacementField

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def _image(data, name="x.png") -> Image:
    arr = torch.as_tensor(np.asarray(data, dtype=np.float32))
    return Image(arr, Grid(tuple(arr.shape)), name)


def _sparse() -> np.ndarray:
    """A few bright structures (1 % of the image) on an exactly dark background."""
    a = np.zeros((128, 128), np.float32)
    a[30:40, 30:40] = 200
    a[80:85, 90:95] = 120
    return a


@pytest.fixture(scope="module")
def pngs(tmp_path_factory) -> dict[str, Path]:
    """A constant picture, an all-zero picture and a 2D phantom pair, as PNG."""
    from fmreg import phantoms

    root = tmp_path_factory.mktemp("inputs")
    ph = phantoms.make_pair(2, seed=0)
    files = {role: write_image(getattr(ph, role).with_data(getattr(ph, role).data.clamp(0, 1) * 255),
                               root / f"{role}.png") for role in ("fixed", "moving")}
    shape = tuple(ph.fixed.data.shape)
    files["constant"] = write_image(_image(np.full(shape, 128)), root / "constant.png")
    files["zeros"] = write_image(_image(np.zeros(shape)), root / "zeros.png")
    return files


def _hashes(paths) -> dict[str, str]:
    return {str(p): hashlib.sha256(Path(p).read_bytes()).hexdigest() for p in paths}


# ---------------------------------------------------------------------------- refusal
@pytest.mark.parametrize("method", ["identity", "samreg"])
@pytest.mark.parametrize("case", ["constant fixed", "zero moving"])
def test_image_without_contrast_is_refused_before_any_work(pngs, tmp_path, capsys, method, case):
    fixed, moving = (pngs["constant"], pngs["moving"]) if case == "constant fixed" else (pngs["fixed"], pngs["zeros"])
    before = _hashes([fixed, moving])
    out = tmp_path / "out"
    assert main(["register", str(fixed), str(moving), "-o", str(out), "--method", method]) == 1
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("fmreg: error")]
    expected = ("fmreg: error: fixed image constant.png has no contrast (every voxel is 128): there is nothing to register"
                if case == "constant fixed" else
                "fmreg: error: moving image zeros.png has no contrast (every voxel is 0): there is nothing to register")
    assert err == [expected]
    assert not out.exists()
    assert _hashes([fixed, moving]) == before


def test_noise_and_a_hot_voxel_have_no_contrast():
    rng = np.random.default_rng(0)
    with pytest.raises(FmregError, match=r"^moving image noise.png has no contrast \(0 % of its voxels stand out"):
        check_contrast(_image(rng.normal(100, 1, (128, 128)), "noise.png"), "moving image")
    hot = np.zeros((128, 128))
    hot[5, 5] = 1000
    with pytest.raises(FmregError, match="no contrast"):
        check_contrast(_image(hot), "fixed image")


def test_sparse_real_looking_images_are_accepted():
    check_contrast(_image(_sparse()), "fixed image")
    noisy = _sparse() / 200 + np.random.default_rng(1).normal(0, 0.02, (128, 128))
    check_contrast(_image(noisy), "fixed image")  # the structures stand out of the noise
    check_contrast(Image(torch.zeros(4, 4, dtype=torch.int64), Grid((4, 4))))  # label maps are not checked


def test_phantoms_have_contrast():
    from fmreg import phantoms

    for ndim in (2, 3):
        ph = phantoms.make_pair(ndim, seed=0)
        check_contrast(ph.fixed)
        check_contrast(ph.moving)


@pytest.mark.skipif(not (SHARED / "pairs.csv").exists(), reason="the example pairs are not here")
def test_no_example_pair_is_refused():
    for row in csv.DictReader((SHARED / "pairs.csv").open()):
        for role in ("fixed", "moving"):
            check_contrast(read_image(SHARED / row[role]), f"{role} image")


# ---------------------------------------------------------------------------- warnings
def test_trust_warnings_from_the_field_and_the_fit_report():
    grid = Grid((32, 32))
    zero = DisplacementField.identity(grid)
    assert trust_warnings(zero, "identity") == []
    assert trust_warnings(zero, "demons") == [
        "demons returned the identity (a zero field): nothing drove the registration"]
    flat = {"image_term": {"metric": "mse", "start": 0.02, "end": 0.0201}}
    shift = DisplacementField(torch.full((2, 32, 32), 0.5), grid)
    assert trust_warnings(shift, "samreg", flat, grid) == [
        "the image term never decreased during the fit (mse 0.02 at the start, 0.0201 at the end): "
        "the images did not drive the registration"]
    better = {"image_term": {"metric": "mse", "start": 0.02, "end": 0.01}}
    assert trust_warnings(shift, "samreg", better, grid) == []
    far = DisplacementField(torch.full((2, 32, 32), 20.0), grid)  # 20 mm of a 32 mm view
    assert trust_warnings(far, "samreg", None, grid) == [
        "displacements reach 28.3 mm, 88 % of the field of view (32 mm)",
        "the transform maps 86 % of the fixed image outside the moving image"]  # a 12 x 12 corner stays
    folded = torch.zeros(2, 32, 32)
    folded[0] = -2.0 * torch.arange(32.0)[None, :]  # x -> -x: det J = -1 everywhere
    warned = trust_warnings(DisplacementField(folded, grid), "samreg")
    assert warned[0] == "the field folds 100.00 % of the fixed image (det J <= 0; above 1 %)"


def test_an_untrustworthy_result_is_warned_in_result_json_and_on_stderr(pngs, tmp_path, monkeypatch, capsys):
    from fmreg.app import common
    from fmreg.methods.base import RegistrationResult

    class Wild:
        name = "wild"
        uses_labels = False

        def register(self, fixed, moving, fixed_labels=None, moving_labels=None):
            data = torch.full((2, *fixed.grid.shape), 400.0)  # far beyond the 160 px view
            return RegistrationResult(DisplacementField(data, fixed.grid), "wild")

    monkeypatch.setattr(common, "get_method", lambda name, **kw: Wild())
    out = tmp_path / "out"
    assert main(["register", str(pngs["fixed"]), str(pngs["moving"]), "-o", str(out), "--method", "wild", "-q"]) == 0
    doc = json.loads((out / "result.json").read_text())
    assert [w.split(",")[0] for w in doc["warnings"]] == [
        "displacements reach 565.7 mm", "the transform maps 100 % of the fixed image outside the moving image"]
    err = capsys.readouterr().err
    assert all(f"warning: {w}" in err for w in doc["warnings"])


def test_the_phantom_pair_with_samreg_has_no_warnings(pngs, tmp_path):
    out = tmp_path / "out"
    assert main(["register", str(pngs["fixed"]), str(pngs["moving"]), "-o", str(out), "-q"]) == 0
    doc = json.loads((out / "result.json").read_text())
    assert doc["warnings"] == []
    term = doc["fit"]["image_term"]
    assert term["metric"] == "mse" and term["end"] < term["start"]
