"""`fmreg bench`: the results table's exact columns, empty cells for missing ground truth,
per-method means, per-pair outputs, and bad manifests refused before any work."""

from __future__ import annotations

import csv
import re
import hashlib
import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch

from fmreg.app.bench import run_bench
from fmreg.cli import main
from fmreg.io.images import read_image, write_image
from fmreg.methods import available_methods

needs_report = pytest.mark.skipif(
    importlib.util.find_spec("fmreg.figures") is None, reason="fmreg.figures (overview pictures) not written yet"
)
METHODS = ["identity", "demons"] if "demons" in available_methods() else ["identity"]

HEADER = "name,fixed,moving,fixed_labels,moving_labels,labels,fixed_landmarks,moving_landmarks"


def _snapshot(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def manifest(tmp_path_factory) -> Path:
    """A 2D PNG pair with a 0..255 mask (``fg``) and landmarks, a 3D NIfTI pair with labels
    ``1 2 3`` and empty landmark cells, and a 2D pair without any ground truth."""
    from fmreg import phantoms

    root = tmp_path_factory.mktemp("bench_data")
    p2 = phantoms.make_pair(2, seed=1)
    d2 = root / "two"
    d2.mkdir()
    write_image(p2.fixed.with_data(p2.fixed.data.clamp(0, 1) * 255), d2 / "f.png")
    write_image(p2.moving.with_data(p2.moving.data.clamp(0, 1) * 255), d2 / "m.png")
    for role, name in (("fixed_labels", "fl.png"), ("moving_labels", "ml.png")):
        lab = getattr(p2, role)
        write_image(lab.with_data((lab.data == 2).to(torch.int64) * 255), d2 / name)
    (d2 / "flm.csv").write_text("x,y\n40,50\n100,80\n")
    (d2 / "mlm.csv").write_text("x,y\n43,54\n100,80\n")

    p3 = phantoms.make_pair(3, seed=1)
    d3 = root / "three"
    d3.mkdir()
    for role, name in (("fixed", "f"), ("moving", "m"), ("fixed_labels", "fl"), ("moving_labels", "ml")):
        write_image(getattr(p3, role), d3 / f"{name}.nii.gz")

    rows = [
        HEADER,
        "pair2d,two/f.png,two/m.png,two/fl.png,two/ml.png,fg,two/flm.csv,two/mlm.csv",
        "pair3d,three/f.nii.gz,three/m.nii.gz,three/fl.nii.gz,three/ml.nii.gz,1 2 3,,",
        "nogt,two/f.png,two/m.png,,,,,",
    ]
    path = root / "pairs.csv"
    path.write_text("\n".join(rows) + "\n")
    return path


def _read_csv(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    with path.open(newline="") as fh:
        reader = csv.DictReader(fh)
        return list(reader.fieldnames or []), list(reader)


@needs_report
@pytest.mark.slow
def test_bench_writes_exact_columns_and_empty_cells(manifest, tmp_path, capsys):
    out = tmp_path / "bench"
    args = ["bench", str(manifest), "-o", str(out)]
    for m in METHODS:
        args += ["--method", m]
    inputs_before = _snapshot(manifest.parent)
    assert main(args) == 0
    assert _snapshot(manifest.parent) == inputs_before

    columns, rows = _read_csv(out / "results.csv")
    assert columns == [
        "name", "method", "dice_mean", "dice_1", "dice_2", "dice_3",
        "hd95_mean", "tre_mean", "tre_median", "folding_pct", "std_log_jacobian", "seconds", "peak_mem_mb",
    ]
    assert [(r["name"], r["method"]) for r in rows] == [(n, m) for n in ("pair2d", "pair3d", "nogt") for m in METHODS]
    by = {(r["name"], r["method"]): r for r in rows}

    r2 = by["pair2d", "identity"]
    assert r2["dice_2"] == r2["dice_3"] == ""  # the fg pair scores value 1 only
    assert 0 < float(r2["dice_1"]) < 1 and float(r2["dice_mean"]) == pytest.approx(float(r2["dice_1"]), abs=1e-5)
    # Landmark TRE under identity: |p - q| = 5 and 0 pixels.
    assert float(r2["tre_mean"]) == pytest.approx(2.5) and float(r2["tre_median"]) == pytest.approx(2.5)

    r3 = by["pair3d", "identity"]
    assert all(r3[c] != "" for c in columns)  # labels 1 2 3, centroid TRE
    assert float(r3["dice_mean"]) == pytest.approx(
        (float(r3["dice_1"]) + float(r3["dice_2"]) + float(r3["dice_3"])) / 3, abs=1e-5
    )

    for m in METHODS:
        r = by["nogt", m]
        assert all(r[c] == "" for c in ("dice_mean", "dice_1", "dice_2", "dice_3", "hd95_mean", "tre_mean", "tre_median"))
        assert r["folding_pct"] != "" and r["std_log_jacobian"] != "" and r["seconds"] != "" and r["peak_mem_mb"] != ""
        assert float(r["seconds"]) >= 0 and float(r["peak_mem_mb"]) >= 0

    md = (out / "results.md").read_text()
    assert "| " + " | ".join(columns) + " |" in md
    assert "Per-method means" in md
    means_part = md.split("Per-method means")[1]
    for m in METHODS:
        assert f"| {m} | 3 |" in means_part
    assert "landmark TRE: pair2d" in md and "centroid TRE: pair3d" in md

    for m in METHODS:
        for n in ("pair2d", "pair3d", "nogt"):
            assert (out / m / n / "overview.png").exists() and (out / m / n / "result.json").exists()
    assert (out / "identity" / "pair2d" / "warped.png").exists()
    assert not list(tmp_path.glob(".fmreg-staging-*"))
    printed = capsys.readouterr().out
    assert "tables:" in printed
    peaks = {m: max(float(r["peak_mem_mb"]) for r in rows if r["method"] == m) for m in METHODS}
    for m in METHODS:
        shown = re.search(rf"^{m}: .*peak memory up to (\d+) MiB$", printed, re.M)
        assert shown and abs(int(shown.group(1)) - peaks[m]) <= 1


@needs_report
def test_bench_pairs_selection_and_api(manifest, tmp_path):
    res = run_bench(manifest, ["identity"], tmp_path / "b", pairs=["pair3d"], progress=False)
    assert [r["name"] for r in res.rows] == ["pair3d"]
    assert res.columns == [
        "name", "method", "dice_mean", "dice_1", "dice_2", "dice_3",
        "hd95_mean", "tre_mean", "tre_median", "folding_pct", "std_log_jacobian", "seconds", "peak_mem_mb",
    ]
    assert res.rows[0]["tre_kind"] == "centroid"
    assert math.isfinite(res.rows[0]["dice_mean"])


def _bad_manifest(root: Path, manifest: Path, case: str) -> Path:
    text = manifest.read_text().splitlines()
    path = root / f"{case.replace(' ', '_')}.csv"
    if case == "missing column":
        # Drop the `moving` column.
        rows = [",".join(c for i, c in enumerate(line.split(",")) if i != 2) for line in text]
        path.write_text("\n".join(rows) + "\n")
    elif case == "missing path":
        path.write_text("\n".join([text[0], text[1].replace("two/m.png", "two/gone.png")]) + "\n")
    elif case == "nan image":
        img = read_image(manifest.parent / "three" / "m.nii.gz")
        data = img.data.clone()
        data[1, 1, 1] = float("nan")
        write_image(img.with_data(data), root / "nan.mha")
        line = text[2].replace("three/m.nii.gz", str(root / "nan.mha"))
        path.write_text("\n".join([text[0], text[1], line]) + "\n")
    elif case == "one-sided labels":
        path.write_text("\n".join([text[0], text[1].replace("two/ml.png", "")]) + "\n")
    return path


@pytest.mark.parametrize("case", ["missing column", "missing path", "nan image", "one-sided labels", "unknown pair", "unknown method", "manifest missing"])
def test_bad_manifest_fails_before_any_output(manifest, tmp_path, capsys, case):
    root = tmp_path / "m"
    root.mkdir()
    if case in ("unknown pair", "unknown method"):
        # Copy the manifest beside its data so relative paths resolve.
        path = manifest
    elif case == "manifest missing":
        path = tmp_path / "nope.csv"
    else:
        path = _bad_manifest(manifest.parent, manifest, case)
    args = ["bench", str(path), "-o", str(tmp_path / "out"), "--method", "identity", "-q"]
    if case == "unknown pair":
        args += ["--pairs", "pair3d", "no-such-pair"]
    if case == "unknown method":
        args += ["--method", "no-such-method"]
    before = _snapshot(manifest.parent)
    rc = main(args)
    err = capsys.readouterr().err.strip()
    assert rc != 0
    assert err.startswith("fmreg: error: ") and "\n" not in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()
    assert _snapshot(manifest.parent) == before
    assert not list(tmp_path.rglob(".fmreg-staging-*")) and not list(manifest.parent.glob(".fmreg-staging-*"))


@needs_report
def test_bench_refuses_to_overwrite_in_the_data_folder(manifest, tmp_path, capsys):
    # Results next to the manifest would replace a file there: refused without --overwrite.
    existing = manifest.parent / "results.csv"
    existing.write_text("precious\n")
    try:
        before = _snapshot(manifest.parent)
        rc = main(["bench", str(manifest), "-o", str(manifest.parent), "--method", "identity", "--pairs", "pair3d", "-q"])
        assert rc == 1 and "--overwrite" in capsys.readouterr().err
        assert _snapshot(manifest.parent) == before
    finally:
        existing.unlink()


def test_bench_params_reach_the_methods_that_declare_them(manifest, tmp_path, capsys):
    from fmreg.cli import main

    out = tmp_path / "b"
    args = ["bench", str(manifest), "-m", "identity", "-m", "demons", "--pairs", "pair2d", "-o", str(out), "-q"]
    assert main([*args, "--param", "iterations=2"]) == 0
    demons = json.loads((out / "demons" / "pair2d" / "result.json").read_text())
    assert demons["parameters"]["iterations"] == [2] * len(demons["parameters"]["shrink_factors"])
    capsys.readouterr()
    assert main([*args[:4], "--pairs", "pair2d", "-o", str(tmp_path / "c"), "--param", "iterations=2", "-q"]) == 1
    assert "no method of this run (identity) takes the parameter(s) iterations" in capsys.readouterr().err
    assert not (tmp_path / "c" / "results.csv").exists()
