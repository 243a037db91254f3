"""The `fmreg` command line: outputs of every subcommand, and bad input refused cleanly.

CLI calls run in-process through ``fmreg.cli.main``; one test starts the installed ``fmreg``
script in a subprocess. Inputs are the built-in phantoms written to a temporary folder:
2D as PNG pictures (the raster path, ``warped.png``) and 3D as NIfTI with an anisotropic,
oblique grid.
"""

from __future__ import annotations

import csv
import hashlib
import importlib.util
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fmreg.cli import main
from fmreg.errors import FmregError
from fmreg.transforms.displacement import DisplacementField
from fmreg.transforms.warp import warp, warp_labels
from fmreg.core.grid import Grid
from fmreg.core.image import Image
from fmreg.io.fields import read_field, write_field
from fmreg.io.images import read_image, write_image
from fmreg.methods import available_methods

HAVE_REPORT = importlib.util.find_spec("fmreg.figures") is not None
needs_report = pytest.mark.skipif(not HAVE_REPORT, reason="fmreg.figures (overview pictures) not written yet")
HAVE_DEMONS = "demons" in available_methods()

OUTPUTS_3D = {"warped.nii.gz", "ddf.nii.gz", "warped_labels.nii.gz", "result.json", "overview.png"}
OUTPUTS_2D_PNG = {"warped.png", "ddf.nii.gz", "warped_labels.png", "result.json", "overview.png"}


# ---------------------------------------------------------------------------- data
def _write_landmarks(path: Path, points) -> None:
    with path.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["x", "y", "z"][: len(points[0])])
        w.writerows(points)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, dict[str, Path]]:
    """Phantom pairs on disk: ``data["2d"]`` as PNG, ``data["3d"]`` as NIfTI, with labels and
    landmarks."""
    from fmreg import phantoms

    root = tmp_path_factory.mktemp("data")
    out: dict[str, dict[str, Path]] = {}
    for ndim in (2, 3):
        ph = phantoms.make_pair(ndim, seed=0)
        d = root / f"{ndim}d"
        d.mkdir()
        ext = ".png" if ndim == 2 else ".nii.gz"
        files = {}
        for role in ("fixed", "moving", "fixed_labels", "moving_labels"):
            img = getattr(ph, role)
            if ndim == 2 and not img.is_label:
                # PNG holds 0..255: scale the phantom's [0, 1] intensities so no detail is lost.
                img = img.with_data(img.data.clamp(0, 1) * 255)
            files[role] = write_image(img, d / f"{role}{ext}")
        if ndim == 2:
            _write_landmarks(d / "fixed_lm.csv", [(40, 50), (100.5, 80), (120, 30)])
            _write_landmarks(d / "moving_lm.csv", [(43, 54), (100.5, 80), (120, 31)])
        else:
            _write_landmarks(d / "fixed_lm.csv", [(0.0, 0.0, 0.0), (10.0, -20.0, 8.0)])
            _write_landmarks(d / "moving_lm.csv", [(3.0, 4.0, 0.0), (10.0, -20.0, 9.0)])
        files["fixed_landmarks"] = d / "fixed_lm.csv"
        files["moving_landmarks"] = d / "moving_lm.csv"
        out[f"{ndim}d"] = files
    return out


def _register_args(files: dict[str, Path], outdir: Path, method: str = "identity", landmarks: bool = False) -> list[str]:
    args = [
        "register", str(files["fixed"]), str(files["moving"]), "-o", str(outdir), "--method", method,
        "--fixed-labels", str(files["fixed_labels"]), "--moving-labels", str(files["moving_labels"]),
    ]
    if landmarks:
        args += ["--fixed-landmarks", str(files["fixed_landmarks"]), "--moving-landmarks", str(files["moving_landmarks"])]
    return args


def _snapshot(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` with its content hash (to prove nothing changed)."""
    if not folder.exists():
        return {}
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def _no_staging_left(folder: Path) -> bool:
    return not list(folder.rglob(".fmreg-staging-*")) and not list(folder.rglob(".fmreg-tmp-*"))


# ---------------------------------------------------------------------------- help
def test_fmreg_help_runs_as_a_program():
    exe = Path(sys.executable).parent / "fmreg"
    cmd = [str(exe), "--help"] if exe.exists() else [sys.executable, "-m", "fmreg.cli", "--help"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    for sub in ("register", "warp", "jacobian", "evaluate", "bench", "demo"):
        assert sub in proc.stdout


def test_every_subcommand_has_help(capsys):
    for sub in ("register", "warp", "jacobian", "evaluate", "bench", "demo"):
        with pytest.raises(SystemExit) as exc:
            main([sub, "--help"])
        assert exc.value.code == 0
        assert "usage: fmreg " + sub in capsys.readouterr().out


# ---------------------------------------------------------------------------- register
@needs_report
def test_register_identity_3d_writes_every_output(data, tmp_path, capsys):
    files = data["3d"]
    out = tmp_path / "out"
    assert main(_register_args(files, out, landmarks=True)) == 0
    assert {p.name for p in out.iterdir()} == OUTPUTS_3D
    assert _no_staging_left(tmp_path)
    err = capsys.readouterr().err
    assert "[fmreg] registering with identity" in err

    doc = json.loads((out / "result.json").read_text())
    assert doc["method"] == "identity"
    assert doc["seconds"] >= 0 and "peak_mem_mb" in doc
    assert doc["grid"]["shape"] == list(read_image(files["fixed"]).grid.shape)
    m = doc["metrics"]
    assert m["labels"] == [1, 2, 3, 4, 5]
    for key in ("dice", "hd95", "asd", "centroid_tre"):
        assert set(m[key]) == {"1", "2", "3", "4", "5"}
    for key in ("mean_dice", "mean_hd95", "mean_asd", "mean_centroid_tre"):
        assert math.isfinite(m[key])
    assert 0.0 < m["mean_dice"] < 1.0  # the phantom pair is deformed
    assert m["folding_pct"] == 0.0 and m["std_log_jacobian"] == 0.0
    # Identity: T(p) = p, so the TRE is |p - q| in mm: 5 and 1.
    assert m["landmark_tre"]["per_point"] == pytest.approx([5.0, 1.0], abs=1e-4)
    assert m["landmark_tre"]["units"] == "mm"

    # The written images are exactly fmreg's warp with the written field.
    field = read_field(out / "ddf.nii.gz")
    moving = read_image(files["moving"])
    expected = warp(moving, field).data
    torch.testing.assert_close(read_image(out / "warped.nii.gz").data, expected)
    expected_labels = warp_labels(read_image(files["moving_labels"], is_label=True), field).data
    assert torch.equal(read_image(out / "warped_labels.nii.gz", is_label=True).data, expected_labels)


@needs_report
@pytest.mark.skipif(not HAVE_DEMONS, reason="methods/demons.py not written yet")
@pytest.mark.parametrize("ndim", ["2d", "3d"])
@pytest.mark.slow
def test_register_demons_writes_outputs_and_matches_warp(data, tmp_path, ndim):
    files = data[ndim]
    out = tmp_path / "out"
    fast = ["--param", "iterations=[30,15,5]"]  # fewer iterations than the defaults: a quick test
    assert main(_register_args(files, out, method="demons", landmarks=True) + fast + ["-q"]) == 0
    assert {p.name for p in out.iterdir()} >= (OUTPUTS_2D_PNG if ndim == "2d" else OUTPUTS_3D)
    doc = json.loads((out / "result.json").read_text())
    assert doc["method"] == "demons" and doc["parameters"]["iterations"] in ([30, 15, 5], (30, 15, 5))
    m = doc["metrics"]
    assert math.isfinite(m["mean_dice"]) and "landmark_tre" in m and "folding_pct" in m

    field = read_field(out / "ddf.nii.gz")
    assert float(field.data.abs().max()) > 0  # demons moved something
    moving = read_image(files["moving"])
    expected = warp(moving, field).data
    if ndim == "3d":
        torch.testing.assert_close(read_image(out / "warped.nii.gz").data, expected)
    else:
        # warped.png holds the warped intensities rounded to 8 bits (the input's range).
        got = read_image(out / "warped.png").data
        assert float((got - expected).abs().max()) <= 0.5 + 1e-3
    # Registration must help on a pair deformed by a known smooth field.
    ident = tmp_path / "ident"
    assert main(_register_args(files, ident, method="identity") + ["-q"]) == 0
    dice_identity = json.loads((ident / "result.json").read_text())["metrics"]["mean_dice"]
    assert m["mean_dice"] > dice_identity


@needs_report
def test_register_2d_png_identity_writes_png_outputs_and_pixel_tre(data, tmp_path):
    files = data["2d"]
    out = tmp_path / "out"
    assert main(_register_args(files, out, landmarks=True) + ["-q"]) == 0
    assert {p.name for p in out.iterdir()} == OUTPUTS_2D_PNG
    doc = json.loads((out / "result.json").read_text())
    tre = doc["metrics"]["landmark_tre"]
    assert tre["per_point"] == pytest.approx([5.0, 0.0, 1.0], abs=1e-6)
    assert tre["units"] == "pixels"
    # Identity on equal grids: warped picture and labels equal the moving ones.
    assert torch.equal(read_image(out / "warped.png").data, read_image(files["moving"]).data)
    assert torch.equal(
        read_image(out / "warped_labels.png", is_label=True).data, read_image(files["moving_labels"], is_label=True).data
    )


@needs_report
def test_register_scores_only_the_requested_labels_and_params_reach_result(data, tmp_path):
    out = tmp_path / "out"
    assert main(_register_args(data["3d"], out) + ["--labels", "2 5", "-q"]) == 0
    m = json.loads((out / "result.json").read_text())["metrics"]
    assert m["labels"] == [2, 5] and set(m["dice"]) == {"2", "5"}


def test_unknown_parameter_is_a_user_error(data, tmp_path, capsys):
    out = tmp_path / "out"
    rc = main(_register_args(data["3d"], out) + ["--param", "iterations=3", "-q"])
    assert rc == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("fmreg: error:") and "\n" not in err
    assert not out.exists()


@needs_report
def test_default_labels_of_a_0_255_mask_are_scored_as_fg(data, tmp_path):
    # A rendered mask (0/255 with anti-aliased edge values) is scored as one foreground label.
    d = tmp_path / "mask"
    d.mkdir()
    lab = read_image(data["2d"]["fixed_labels"], is_label=True).data
    mask = ((lab == 2) * 255).to(torch.int64)
    mask[0, :3] = torch.tensor([90, 140, 200])  # anti-aliasing
    write_image(Image(mask, Grid(tuple(mask.shape))), d / "f.png")
    write_image(Image(mask, Grid(tuple(mask.shape))), d / "m.png")
    out = tmp_path / "out"
    files = {**data["2d"], "fixed_labels": d / "f.png", "moving_labels": d / "m.png"}
    assert main(_register_args(files, out) + ["-q"]) == 0
    m = json.loads((out / "result.json").read_text())["metrics"]
    assert m["labels"] == "fg" and m["dice"] == {"1": 1.0}


@needs_report
def test_empty_label_reports_nan_with_a_warning_line(data, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(_register_args(data["3d"], out) + ["--labels", "1 9"]) == 0
    m = json.loads((out / "result.json").read_text())["metrics"]
    assert m["dice"]["9"] is None and m["hd95"]["9"] is None  # NaN, written as JSON null
    assert m["dice"]["1"] > 0 and m["mean_dice"] == m["dice"]["1"]
    err = capsys.readouterr().err
    warnings_ = [line for line in err.splitlines() if "warning" in line and "9" in line]
    assert warnings_ and all(line.startswith("[fmreg] warning:") for line in warnings_)
    assert "Traceback" not in err


@needs_report
def test_roi_pairs_and_info_of_a_method_are_written(data, tmp_path, monkeypatch):
    """A method returns ROI pairs as data; the app summarises them and draws roi_pairs.png."""
    from fmreg.app import common
    from fmreg.correspond.pairs import RoiPair
    from fmreg.methods.base import RegistrationResult

    class Fancy:
        name = "fancy"
        uses_labels = True

        def __init__(self):
            self.seen = None

        def register(self, fixed, moving, fixed_labels=None, moving_labels=None):
            self.seen = (fixed_labels, moving_labels)
            fm = fixed_labels.data == 1
            mm = moving_labels.data == 1
            return RegistrationResult(
                DisplacementField.identity(fixed.grid),
                "fancy-labels",
                parameters={"k": 1},
                roi_pairs=[RoiPair(fm, mm, 0.9)],
                stage_seconds={"fit": 0.25},
                info={"method": "shadowed"},
            )

    inst = Fancy()
    monkeypatch.setattr(common, "get_method", lambda name, **kw: inst)
    out = tmp_path / "out"
    assert main(_register_args(data["3d"], out, method="fancy") + ["-q"]) == 0
    assert (out / "roi_pairs.png").read_bytes()[:4] == b"\x89PNG"
    doc = json.loads((out / "result.json").read_text())
    assert doc["method"] == "fancy-labels" and doc["parameters"] == {"k": 1}
    assert [p["similarity"] for p in doc["roi_pairs"]] == [0.9] and doc["info"] == {"method": "shadowed"}
    assert doc["stage_seconds"] == {"fit": 0.25}
    assert "roi_pairs.png" in doc["outputs"]
    # A label-based method receives the label maps.
    assert inst.seen[0] is not None and inst.seen[1] is not None


def test_labels_reach_only_label_based_methods(data, tmp_path, monkeypatch):
    from fmreg.app import common

    seen = {}

    class Spy:
        name = "spy"
        uses_labels = False

        def register(self, fixed, moving, fixed_labels=None, moving_labels=None):
            seen["labels"] = (fixed_labels, moving_labels)
            raise KeyboardInterrupt  # also checks Ctrl-C: exit 130, nothing written

    monkeypatch.setattr(common, "get_method", lambda name, **kw: Spy())
    out = tmp_path / "out"
    assert main(_register_args(data["3d"], out, method="spy") + ["-q"]) == 130
    assert seen["labels"] == (None, None)
    assert not out.exists() and _no_staging_left(tmp_path)


def test_unexpected_exception_keeps_its_traceback(data, tmp_path, monkeypatch):
    from fmreg.app import common

    class Buggy:
        name = "buggy"
        uses_labels = False

        def register(self, *a, **k):
            raise ZeroDivisionError("a bug")

    monkeypatch.setattr(common, "get_method", lambda name, **kw: Buggy())
    with pytest.raises(ZeroDivisionError):
        main(_register_args(data["3d"], tmp_path / "out", method="buggy") + ["-q"])
    assert not (tmp_path / "out").exists() and _no_staging_left(tmp_path)


@needs_report
def test_failure_while_writing_leaves_no_partial_output(data, tmp_path, monkeypatch):
    from fmreg.figures import overview

    def broken(*a, **k):
        raise FmregError("cannot draw")

    monkeypatch.setattr(overview, "save_overview", broken)
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    before = _snapshot(out)
    assert main(_register_args(data["3d"], out) + ["-q"]) == 1
    assert _snapshot(out) == before  # warped/ddf were written to staging only
    assert _no_staging_left(tmp_path)


@needs_report
def test_rerun_into_own_outdir_replaces_outputs(data, tmp_path):
    out = tmp_path / "out"
    assert main(_register_args(data["3d"], out) + ["-q"]) == 0
    (out / "notes.txt").write_text("kept")
    assert main(_register_args(data["3d"], out) + ["-q", "--labels", "1"]) == 0
    assert json.loads((out / "result.json").read_text())["metrics"]["labels"] == [1]
    assert (out / "notes.txt").read_text() == "kept"


# ---------------------------------------------------------------------------- warp / jacobian / evaluate
@needs_report
def test_warp_cli_reproduces_the_registered_outputs(data, tmp_path):
    files = data["3d"]
    out = tmp_path / "out"
    assert main(_register_args(files, out) + ["-q"]) == 0
    # Use a non-trivial field so the check means something: shift by 3 mm along world x.
    field = read_field(out / "ddf.nii.gz")
    field.data[0] += 3.0
    ddf = write_field(field, tmp_path / "shift.nii.gz")
    w = tmp_path / "w.nii.gz"
    assert main(["warp", str(files["moving"]), str(ddf), "-r", str(files["fixed"]), "-o", str(w), "-q"]) == 0
    torch.testing.assert_close(read_image(w).data, warp(read_image(files["moving"]), read_field(ddf)).data)
    wl = tmp_path / "wl.nii.gz"
    assert main(["warp", str(files["moving_labels"]), str(ddf), "-r", str(files["fixed"]), "-o", str(wl), "--labels", "-q"]) == 0
    got = read_image(wl, is_label=True).data
    assert got.dtype == torch.int64
    assert torch.equal(got, warp_labels(read_image(files["moving_labels"], is_label=True), read_field(ddf)).data)
    ws = tmp_path / "ws.nii.gz"
    assert main(["warp", str(files["moving_labels"]), str(ddf), "-r", str(files["fixed"]), "-o", str(ws), "--labels", "--smooth", "-q"]) == 0
    smooth = warp_labels(read_image(files["moving_labels"], is_label=True), read_field(ddf), smooth=True).data
    assert torch.equal(read_image(ws, is_label=True).data, smooth)
    # The registration's own field reproduces warped.nii.gz.
    w2 = tmp_path / "w2.nii.gz"
    assert main(["warp", str(files["moving"]), str(out / "ddf.nii.gz"), "-r", str(files["fixed"]), "-o", str(w2), "-q"]) == 0
    torch.testing.assert_close(read_image(w2).data, read_image(out / "warped.nii.gz").data)


@needs_report
@pytest.mark.parametrize("ndim", [2, 3])
def test_jacobian_of_identity_field_is_one(tmp_path, ndim):
    grid = Grid((6, 8, 10), spacing=(1.5, 2.0, 7.0), origin=(1.0, 2.0, 3.0)) if ndim == 3 else Grid((12, 9), spacing=(0.5, 2.0))
    ddf = write_field(DisplacementField.identity(grid), tmp_path / "ddf.nii.gz")
    out = tmp_path / "jac.nii.gz"
    assert main(["jacobian", str(ddf), "-o", str(out), "-q"]) == 0
    jac = read_image(out)
    assert jac.grid.same_as(grid)
    torch.testing.assert_close(jac.data, torch.ones(grid.shape))
    assert (tmp_path / "jac.png").stat().st_size > 0
    png_only = tmp_path / "pic" / "j.png"
    assert main(["jacobian", str(ddf), "-o", str(png_only), "-q"]) == 0
    assert [p.name for p in png_only.parent.iterdir()] == ["j.png"]


def test_evaluate_identical_labels_gives_dice_one(data, tmp_path, capsys):
    lab = data["3d"]["fixed_labels"]
    ddf = write_field(DisplacementField.identity(read_image(lab, is_label=True).grid), tmp_path / "ddf.nii.gz")
    out = tmp_path / "eval.json"
    rc = main([
        "evaluate", "--fixed-labels", str(lab), "--warped-labels", str(lab), "--ddf", str(ddf),
        "--fixed-landmarks", str(data["3d"]["fixed_landmarks"]), "--moving-landmarks", str(data["3d"]["moving_landmarks"]),
        "-o", str(out), "-q",
    ])
    assert rc == 0
    m = json.loads(out.read_text())["metrics"]
    assert m["dice"] == {str(v): 1.0 for v in range(1, 6)} and m["mean_dice"] == 1.0
    assert m["mean_hd95"] == 0.0 and m["mean_centroid_tre"] == 0.0
    assert m["landmark_tre"]["per_point"] == pytest.approx([5.0, 1.0], abs=1e-4)
    assert m["folding_pct"] == 0.0
    assert "mean   1.000" in capsys.readouterr().out


def test_evaluate_landmarks_need_the_field(data, tmp_path, capsys):
    lab = data["3d"]["fixed_labels"]
    rc = main([
        "evaluate", "--fixed-labels", str(lab), "--warped-labels", str(lab),
        "--fixed-landmarks", str(data["3d"]["fixed_landmarks"]), "--moving-landmarks", str(data["3d"]["moving_landmarks"]), "-q",
    ])
    assert rc == 1 and "--ddf" in capsys.readouterr().err


# ---------------------------------------------------------------------------- demo
@needs_report
@pytest.mark.slow
def test_demo_registers_both_phantoms(tmp_path, capsys):
    out = tmp_path / "demo"
    args = ["--method", "demons", "--param", "iterations=[30,15,5]"] if HAVE_DEMONS else ["--method", "identity"]
    assert main(["demo", "-o", str(out), *args, "-q"]) == 0
    for tag in ("2d", "3d"):
        assert (out / tag / "overview.png").exists() and (out / tag / "result.json").exists()
        assert (out / "data" / tag / "fixed.nii.gz").exists()
    text = capsys.readouterr().out
    assert "2D phantom: mean Dice" in text and "3D phantom: mean Dice" in text
    assert str(out / "2d" / "overview.png") in text
    if HAVE_DEMONS:
        import re

        before, after = map(float, re.search(r"3D phantom: mean Dice ([\d.]+) before -> ([\d.]+) after", text).groups())
        assert after > before


def test_default_method_is_samreg(capsys):
    from fmreg.app import common

    assert common.DEFAULT_METHOD == "samreg"
    with pytest.raises(SystemExit):
        main(["register", "--help"])
    assert "(default: samreg)" in capsys.readouterr().out


@needs_report
@pytest.mark.skipif("samreg" not in available_methods(), reason="methods/samreg.py not written yet")
@pytest.mark.slow
def test_register_without_method_runs_samreg(data, tmp_path):
    files = data["2d"]
    out = tmp_path / "out"
    args = ["register", str(files["fixed"]), str(files["moving"]), "-o", str(out), "-q",
            "--fixed-labels", str(files["fixed_labels"]), "--moving-labels", str(files["moving_labels"])]
    assert main(args) == 0
    doc = json.loads((out / "result.json").read_text())
    assert doc["method"].startswith("samreg")
    assert OUTPUTS_2D_PNG <= {p.name for p in out.iterdir()}
    assert set(doc["outputs"]) == {p.name for p in out.iterdir()}


# ---------------------------------------------------------------------------- bad input
def _bad_cases(data: dict, root: Path) -> dict[str, list[str]]:
    """Each case: CLI arguments that must fail cleanly. Broken inputs are made under ``root``."""
    f2, f3 = data["2d"], data["3d"]
    bad = root / "bad"
    bad.mkdir(exist_ok=True)
    (bad / "garbage.nii.gz").write_bytes(b"this is not a NIfTI file")
    img = read_image(f3["fixed"])
    # MetaImage, not NIfTI: ITK's NIfTI reader turns NaN/Inf into 0 on reading.
    nan = img.data.clone()
    nan[2, 10, 10] = float("nan")
    write_image(img.with_data(nan), bad / "nan.mha")
    inf = img.data.clone()
    inf[0, 0, 0] = float("inf")
    write_image(img.with_data(inf), bad / "inf.mha")
    shifted = Grid(img.grid.shape, img.grid.spacing, tuple(o + 5 for o in img.grid.origin), img.grid.direction)
    write_image(Image(read_image(f3["fixed_labels"], is_label=True).data, shifted), bad / "offgrid_labels.nii.gz")
    small = read_image(f3["fixed_labels"], is_label=True).data[:, :50]
    write_image(Image(small, Grid(tuple(small.shape))), bad / "small_labels.nii.gz")
    out = str(root / "out")
    reg = ["register", str(f3["fixed"]), str(f3["moving"]), "-o", out, "--method", "identity"]
    return {
        "missing file": ["register", str(f3["fixed"]), str(root / "nope.nii.gz"), "-o", out, "--method", "identity"],
        "unreadable file": ["register", str(f3["fixed"]), str(bad / "garbage.nii.gz"), "-o", out, "--method", "identity"],
        "2d vs 3d": ["register", str(f3["fixed"]), str(f2["moving"]), "-o", out, "--method", "identity"],
        "nan intensities": ["register", str(f3["fixed"]), str(bad / "nan.mha"), "-o", out, "--method", "identity"],
        "inf intensities": ["register", str(bad / "inf.mha"), str(f3["moving"]), "-o", out, "--method", "identity"],
        "labels off grid": reg + ["--fixed-labels", str(bad / "offgrid_labels.nii.gz"), "--moving-labels", str(f3["moving_labels"])],
        "labels wrong shape": reg + ["--fixed-labels", str(f3["fixed_labels"]), "--moving-labels", str(bad / "small_labels.nii.gz")],
        "one landmark file": reg + ["--fixed-landmarks", str(f3["fixed_landmarks"])],
        "2d landmarks on 3d": reg + ["--fixed-landmarks", str(f2["fixed_landmarks"]), "--moving-landmarks", str(f2["moving_landmarks"])],
        "labels without maps": reg + ["--labels", "1 2"],
        "bad labels text": reg + ["--fixed-labels", str(f3["fixed_labels"]), "--moving-labels", str(f3["moving_labels"]), "--labels", "one"],
        "unknown method": ["register", str(f3["fixed"]), str(f3["moving"]), "-o", out, "--method", "no-such-method"],
        "bad param": reg + ["--param", "novalue"],
        "outdir in input folder": ["register", str(f3["fixed"]), str(f3["moving"]), "-o", str(f3["fixed"].parent), "--method", "identity", "--fixed-labels", str(f3["fixed_labels"]), "--moving-labels", str(f3["moving_labels"])],
        "outdir is a file": ["register", str(f3["fixed"]), str(f3["moving"]), "-o", str(f3["fixed"]), "--method", "identity"],
        "warp output is input": ["warp", str(f3["moving"]), str(root / "ddf.nii.gz"), "-r", str(f3["fixed"]), "-o", str(f3["moving"]), "--overwrite"],
        "warp field off reference": ["warp", str(f2["moving"]), str(root / "ddf.nii.gz"), "-r", str(f2["fixed"]), "-o", out + ".png"],
        "warp nan": ["warp", str(bad / "nan.mha"), str(root / "ddf.nii.gz"), "-r", str(f3["fixed"]), "-o", out + ".nii.gz"],
        "jacobian of an image": ["jacobian", str(f3["fixed"]), "-o", out + ".nii.gz"],
        "jacobian missing": ["jacobian", str(root / "nope.nii.gz"), "-o", out + ".nii.gz"],
        "evaluate off grid": ["evaluate", "--fixed-labels", str(f3["fixed_labels"]), "--warped-labels", str(bad / "small_labels.nii.gz"), "-o", out + ".json"],
        "evaluate output is input": ["evaluate", "--fixed-labels", str(f3["fixed_labels"]), "--warped-labels", str(f3["moving_labels"]), "-o", str(f3["fixed_labels"])],
    }


CASES = [
    "missing file", "unreadable file", "2d vs 3d", "nan intensities", "inf intensities", "labels off grid",
    "labels wrong shape", "one landmark file", "2d landmarks on 3d", "labels without maps", "bad labels text",
    "unknown method", "bad param", "outdir in input folder", "outdir is a file", "warp output is input",
    "warp field off reference", "warp nan", "jacobian of an image", "jacobian missing", "evaluate off grid",
    "evaluate output is input",
]


@pytest.mark.parametrize("case", CASES)
def test_bad_input_fails_cleanly(data, tmp_path, capsys, case):
    data_root = Path(data["3d"]["fixed"]).parent.parent
    # The 3D field for warp cases.
    write_field(DisplacementField.identity(read_image(data["3d"]["fixed"]).grid), tmp_path / "ddf.nii.gz")
    # Make the input folder hold files a register run would overwrite.
    (Path(data["3d"]["fixed"]).parent / "result.json").write_text("{}")
    args = _bad_cases(data, tmp_path)[case]
    inputs_before = _snapshot(data_root)
    tmp_before = {k: v for k, v in _snapshot(tmp_path).items()}
    rc = main(args + ["-q"])
    captured = capsys.readouterr()
    assert rc != 0
    err = captured.err.strip()
    assert err.startswith("fmreg: error: ") and "\n" not in err, err
    assert "Traceback" not in captured.err + captured.out
    assert _snapshot(data_root) == inputs_before  # inputs byte-identical, nothing added
    assert _snapshot(tmp_path) == tmp_before  # no output, partial or not
    assert not (tmp_path / "out").exists()
    assert _no_staging_left(tmp_path) and _no_staging_left(data_root)


@needs_report
def test_outdir_in_input_folder_is_allowed_with_overwrite(data, tmp_path):
    d = tmp_path / "inputs"
    shutil.copytree(Path(data["3d"]["fixed"]).parent, d)
    (d / "result.json").write_text("{}")
    before = _snapshot(d)
    args = ["register", str(d / "fixed.nii.gz"), str(d / "moving.nii.gz"), "-o", str(d), "--method", "identity", "-q"]
    assert main(args) == 1
    assert _snapshot(d) == before
    assert main(args + ["--overwrite"]) == 0
    after = _snapshot(d)
    assert all(after[k] == v for k, v in before.items() if k != "result.json")  # inputs untouched
    assert json.loads((d / "result.json").read_text())["method"] == "identity"
