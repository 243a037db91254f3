"""The user contract under bad input (issue 12, items 1, 5, 6 and 8), through the command line:
output folders that cannot be written, stale outputs of an earlier run, unreadable files,
Ctrl-C during start-up, bench progress lines and honest units in ``result.json``.

Each test asserts the exit status, the one-line message, that no input changed and that no
partial output remains."""

from __future__ import annotations

import hashlib
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from fmreg.cli import main
from fmreg.io.images import read_image, write_image


def _snapshot(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` with its content hash (to prove nothing changed)."""
    if not folder.exists():
        return {}
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _no_staging_left(folder: Path) -> bool:
    return not list(folder.rglob(".fmreg-staging-*")) and not list(folder.rglob(".fmreg-tmp-*"))


def _one_error_line(err: str) -> str:
    err = err.strip()
    assert err.startswith("fmreg: error: ") and "\n" not in err, err
    assert "Traceback" not in err and ".fmreg-staging" not in err, err
    return err


@pytest.fixture(scope="module")
def pair(tmp_path_factory) -> dict[str, Path]:
    """A small 2D phantom pair with labels, as NIfTI, in its own folder."""
    from fmreg import phantoms

    d = tmp_path_factory.mktemp("contract_data")
    ph = phantoms.make_pair(2, seed=0)
    return {role: write_image(getattr(ph, role), d / f"{role}.nii.gz")
            for role in ("fixed", "moving", "fixed_labels", "moving_labels")}


def _register(pair: dict[str, Path], out: Path, labels: bool = True) -> list[str]:
    args = ["register", str(pair["fixed"]), str(pair["moving"]), "-o", str(out), "--method", "identity"]
    if labels:
        args += ["--fixed-labels", str(pair["fixed_labels"]), "--moving-labels", str(pair["moving_labels"])]
    return args


def _cannot_write_as_root(folder: Path) -> bool:
    """True where the permission bits do not stop writes (root): then the test denies them."""
    probe = folder / ".probe"
    try:
        probe.write_text("x")
    except OSError:
        return False
    probe.unlink()
    return True


def _deny_writes_to(monkeypatch, folder: Path) -> None:
    """Make ``os.access`` report ``folder`` unwritable (as for a user without permission)."""
    real = os.access

    def access(path, mode, *a, **k):
        if Path(path).resolve() == folder.resolve() and mode & os.W_OK:
            return False
        return real(path, mode, *a, **k)

    monkeypatch.setattr(os, "access", access)


# ---------------------------------------------------------------------------- item 1
def test_read_only_existing_outdir_fails_before_registering(pair, tmp_path, monkeypatch, capsys):
    from fmreg.app import register as register_app

    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    out.chmod(0o555)
    try:
        if _cannot_write_as_root(out):
            _deny_writes_to(monkeypatch, out)

        def never(*a, **k):
            raise AssertionError("the registration ran although the output folder is read-only")

        monkeypatch.setattr(register_app, "_run_method", never)
        inputs = _snapshot(pair["fixed"].parent)
        before = _snapshot(out)
        assert main(_register(pair, out) + ["-q"]) == 1
        err = _one_error_line(capsys.readouterr().err)
        assert err == f"fmreg: error: cannot write into output folder {out}: permission denied"
        assert _snapshot(out) == before and _snapshot(pair["fixed"].parent) == inputs
        assert _no_staging_left(tmp_path)
    finally:
        out.chmod(0o755)


def test_writable_outdir_under_read_only_parent_is_used(pair, tmp_path, monkeypatch):
    parent = tmp_path / "ro"
    out = parent / "out"
    out.mkdir(parents=True)
    parent.chmod(0o555)
    try:
        if _cannot_write_as_root(parent):
            _deny_writes_to(monkeypatch, parent)
        assert main(_register(pair, out) + ["-q"]) == 0
        assert {"warped.nii.gz", "ddf.nii.gz", "result.json"} <= {p.name for p in out.iterdir()}
        assert sorted(p.name for p in parent.iterdir()) == ["out"]  # nothing staged beside OUT
        assert _no_staging_left(tmp_path)
    finally:
        parent.chmod(0o755)


def _commands_into(pair: dict[str, Path], out: Path, tmp_path: Path) -> dict[str, list[str]]:
    from fmreg.io.fields import write_field
    from fmreg.transforms.displacement import DisplacementField

    ddf = write_field(DisplacementField.identity(read_image(pair["fixed"]).grid), tmp_path / "ddf.nii.gz")
    manifest = tmp_path / "pairs.csv"
    manifest.write_text(f"name,fixed,moving\np,{pair['fixed']},{pair['moving']}\n")
    return {
        "register": _register(pair, out),
        "warp": ["warp", str(pair["moving"]), str(ddf), "-r", str(pair["fixed"]), "-o", str(out / "w.nii.gz")],
        "jacobian": ["jacobian", str(ddf), "-o", str(out / "j.nii.gz")],
        "bench": ["bench", str(manifest), "-m", "identity", "-o", str(out)],
        "demo": ["demo", "-o", str(out), "-m", "identity"],
    }


@pytest.mark.parametrize("command", ["register", "warp", "jacobian", "bench", "demo"])
def test_outdir_that_cannot_be_created_fails_first_naming_it(pair, tmp_path, capsys, command):
    blocker = tmp_path / "a_file"
    blocker.write_text("in the way")
    out = blocker / "out"
    args = _commands_into(pair, out, tmp_path)[command]
    before, inputs = _snapshot(tmp_path), _snapshot(pair["fixed"].parent)
    assert main(args + ["-q"]) == 1
    err = _one_error_line(capsys.readouterr().err)
    assert err == f"fmreg: error: cannot create output folder {out}: {blocker} is a file, not a folder"
    assert _snapshot(tmp_path) == before and _snapshot(pair["fixed"].parent) == inputs


def test_disk_error_while_writing_names_the_output_not_the_staging(pair, tmp_path, monkeypatch, capsys):
    from fmreg.app import register as register_app

    def full(field, path):
        raise OSError(28, "No space left on device", str(path))

    monkeypatch.setattr(register_app, "write_field", full)
    out = tmp_path / "out"
    assert main(_register(pair, out) + ["-q"]) == 1
    err = _one_error_line(capsys.readouterr().err)
    assert err == f"fmreg: error: cannot write {out / 'ddf.nii.gz'}: No space left on device"
    assert not out.exists() and _no_staging_left(tmp_path)


# ---------------------------------------------------------------------------- item 5
def test_overwrite_removes_only_fmregs_own_stale_outputs(pair, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(_register(pair, out) + ["-q"]) == 0
    assert (out / "warped_labels.nii.gz").exists()
    (out / "notes.txt").write_text("kept")
    inputs = _snapshot(pair["fixed"].parent)

    # Without --overwrite (as before): the earlier file stays, and the log says so.
    assert main(_register(pair, out, labels=False)) == 0
    assert (out / "warped_labels.nii.gz").exists()
    assert "keeps earlier outputs not written this time (warped_labels.nii.gz)" in capsys.readouterr().err

    assert main(_register(pair, out, labels=False) + ["--overwrite", "-q"]) == 0
    doc = json.loads((out / "result.json").read_text())
    assert sorted(p.name for p in out.iterdir()) == sorted([*doc["outputs"], "notes.txt"])
    assert (out / "notes.txt").read_text() == "kept"
    assert _snapshot(pair["fixed"].parent) == inputs and _no_staging_left(tmp_path)


def test_bench_overwrite_removes_stale_pair_folders_only(pair, tmp_path):
    manifest = tmp_path / "pairs.csv"
    manifest.write_text(f"name,fixed,moving\na,{pair['fixed']},{pair['moving']}\nb,{pair['fixed']},{pair['moving']}\n")
    out = tmp_path / "bench"
    assert main(["bench", str(manifest), "-m", "identity", "-o", str(out), "-q"]) == 0
    assert (out / "identity" / "b" / "result.json").exists()
    (out / "identity" / "b" / "mine.txt").write_text("kept")
    (out / "other").mkdir()
    (out / "other" / "result.json").write_text("not fmreg's")
    args = ["bench", str(manifest), "-m", "identity", "-o", str(out), "--pairs", "a", "-q"]
    assert main(args) == 0
    assert (out / "identity" / "b" / "result.json").exists()  # kept without --overwrite
    assert main(args + ["--overwrite"]) == 0
    assert sorted(p.name for p in (out / "identity" / "b").iterdir()) == ["mine.txt"]
    assert (out / "other" / "result.json").read_text() == "not fmreg's"
    assert (out / "identity" / "a" / "result.json").exists()
    rows = (out / "results.csv").read_text().splitlines()
    assert len(rows) == 2 and rows[1].startswith("a,") and _no_staging_left(tmp_path)


# ---------------------------------------------------------------------------- item 6
def _truncated_nrrd(path: Path) -> Path:
    import SimpleITK as sitk
    import numpy as np

    full = path.with_name("full.nrrd")
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((10, 10, 10), np.float32)), str(full))
    path.write_bytes(full.read_bytes()[:-2000])
    full.unlink()
    return path


@pytest.mark.parametrize("kind", ["garbage", "truncated"])
def test_unreadable_file_error_gives_itks_reason_in_one_line(pair, tmp_path, capsys, kind):
    bad = tmp_path / "in" / ("bad.nii.gz" if kind == "garbage" else "bad.nrrd")
    bad.parent.mkdir()
    if kind == "garbage":
        bad.write_bytes(b"this is not a NIfTI file")
    else:
        _truncated_nrrd(bad)
    before = _snapshot(bad.parent)
    out = tmp_path / "out"
    assert main(["register", str(pair["fixed"]), str(bad), "-o", str(out), "--method", "identity", "-q"]) == 1
    err = _one_error_line(capsys.readouterr().err)
    assert ".cxx" not in err and "Exception thrown" not in err and "ERROR:" not in err
    if kind == "garbage":
        assert err == (f'fmreg: error: cannot read {bad}: Unable to determine ImageIO reader for "{bad}" '
                       "(not an image format ITK reads, or a damaged file)")
    else:
        assert err.startswith(f"fmreg: error: cannot read {bad}: Read: Error reading") and "fread got only" in err
    assert _snapshot(bad.parent) == before and not out.exists()


# ---------------------------------------------------------------------------- item 8
def test_ctrl_c_during_start_up_exits_130_with_one_line(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}
    proc = subprocess.Popen([sys.executable, "-m", "fmreg", "--version"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, cwd=tmp_path)
    time.sleep(0.5)  # inside the imports (torch alone takes longer)
    if proc.poll() is not None:
        pytest.skip("fmreg started before the interrupt could be sent")
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert err == "fmreg: interrupted\n" and out == ""
    assert list(tmp_path.iterdir()) == []


def test_console_script_is_the_light_wrapper():
    import tomllib

    with open(Path(__file__).resolve().parents[1] / "pyproject.toml", "rb") as fh:
        scripts = tomllib.load(fh)["project"]["scripts"]
    assert scripts["fmreg"] == "fmreg.__main__:main"
    code = "import sys, fmreg.__main__; print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip() == "False"


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize("terminal", [False, True])
def test_bench_progress_and_log_lines_never_share_a_line(pair, tmp_path, monkeypatch, capsys, terminal):
    manifest = tmp_path / "pairs.csv"
    manifest.write_text(f"name,fixed,moving\na,{pair['fixed']},{pair['moving']}\nb,{pair['fixed']},{pair['moving']}\n")
    fake = _Terminal()
    if terminal:
        monkeypatch.setattr(sys, "stderr", fake)
    assert main(["bench", str(manifest), "-m", "identity", "-o", str(tmp_path / "out")]) == 0
    err = fake.getvalue() if terminal else capsys.readouterr().err
    assert "[fmreg] [1/2] a / identity" in err and "[fmreg] [2/2] b / identity" in err
    if terminal:
        assert "fmreg bench" in err  # the bar was drawn ...
        # ... and every log line starts a line of its own (tqdm clears the bar with "\r").
        starts = [err[i - 1] if i else "\n" for i in _find_all(err, "[fmreg]")]
        assert all(c in "\n\r" for c in starts), err
    else:
        assert "\r" not in err and "fmreg bench" not in err  # no bar redraws in a log file
        assert all(line.startswith("[fmreg] ") for line in err.splitlines()), err


def _find_all(text: str, sub: str) -> list[int]:
    out, i = [], text.find(sub)
    while i >= 0:
        out.append(i)
        i = text.find(sub, i + 1)
    return out


def test_roi_sizes_carry_their_unit_2d_area_3d_volume():
    from fmreg.core.grid import Grid
    from fmreg.correspond.pairs import RoiPair

    for shape, spacing, key, value in (((4, 5), (0.5, 2.0), "area_mm2", 6.0), ((2, 4, 5), (0.5, 2.0, 3.0), "volume_mm3", 18.0)):
        mask = torch.zeros(shape, dtype=torch.bool)
        mask[(0,) * (len(shape) - 2) + (slice(0, 2), slice(0, 3))] = True
        s = RoiPair(mask, mask, 0.9).summary(Grid(shape, spacing), Grid(shape, spacing))
        assert s[f"fixed_{key}"] == value and s[f"moving_{key}"] == value
        assert not any(k.endswith("_area_mm") for k in s)
