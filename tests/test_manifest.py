"""Pair manifests and landmark files: the real manifest and hand-written broken ones."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch.testing import assert_close

from fmreg.errors import FmregError
from fmreg.io.manifest import (
    Case,
    LabelSpec,
    binarize_fg,
    read_landmark_pair,
    read_landmarks,
    read_manifest,
)

# The shared data sit beside the repository (README: `../shared/data`).
REAL_MANIFEST = Path(__file__).resolve().parents[2] / "shared" / "data" / "pairs.csv"

HEADER = "name,fixed,moving,fixed_labels,moving_labels,labels,fixed_landmarks,moving_landmarks"


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    """A folder with empty stand-in files; a manifest written there refers to them."""
    for name in ("f.nii.gz", "m.nii.gz", "fl.nii.gz", "ml.nii.gz", "f.png", "m.png"):
        (tmp_path / name).write_bytes(b"")
    (tmp_path / "lm_f.csv").write_text("x,y,z\n1,2,3\n4,5,6\n")
    (tmp_path / "lm_m.csv").write_text("x,y,z\n1.5,2,3\n4,5,6.25\n")
    return tmp_path


def _write(folder: Path, *lines: str) -> Path:
    path = folder / "pairs.csv"
    path.write_text("\n".join(lines) + "\n")
    return path


# ------------------------------------------------------------------------------ real data
@pytest.mark.skipif(not REAL_MANIFEST.is_file(), reason="shared data not available")
def test_real_manifest():
    pairs = read_manifest(REAL_MANIFEST)
    assert len(pairs) == 12
    assert len({p.name for p in pairs}) == 12
    acdc = pairs[0]
    assert acdc.name == "acdc_p068_es_to_ed"
    assert acdc.label_spec == LabelSpec(values=(1, 2, 3))
    assert acdc.scored_values() == (1, 2, 3)
    assert acdc.paths["fixed"].name == "patient068_frame01.nii.gz"
    assert acdc.paths["moving_labels"].name == "patient068_frame12_gt.nii.gz"
    for p in pairs[1:]:
        assert p.label_spec.fg and p.scored_values() == (1,)
    for p in pairs:
        assert isinstance(p, Case) and not p.loaded
        assert p.has_labels and not p.has_landmarks
        assert p.paths["fixed_landmarks"] is None and p.paths["moving_landmarks"] is None
        for path in (p.paths[r] for r in ("fixed", "moving", "fixed_labels", "moving_labels")):
            assert path.is_absolute() and path.is_file()
            assert path.is_relative_to(REAL_MANIFEST.parent)


# ------------------------------------------------------------------------------ good manifests
def test_paths_resolve_relative_to_manifest_folder(data_dir, tmp_path_factory, monkeypatch):
    path = _write(
        data_dir,
        HEADER,
        "a,f.nii.gz,m.nii.gz,fl.nii.gz,ml.nii.gz,0 2 5,lm_f.csv,lm_m.csv",
        "b,./f.png,m.png,,,,,",
    )
    monkeypatch.chdir(tmp_path_factory.mktemp("elsewhere"))
    a, b = read_manifest(path)
    assert a.paths["fixed"] == data_dir / "f.nii.gz"
    assert a.paths["fixed_landmarks"] == data_dir / "lm_f.csv"
    assert a.label_spec.values == (0, 2, 5) and not a.label_spec.fg
    assert a.scored_values() == (0, 2, 5)
    assert a.has_landmarks
    assert b.paths["fixed"] == data_dir / "f.png"
    assert (b.paths["fixed_labels"], b.paths["moving_labels"], b.paths["fixed_landmarks"]) == (None, None, None)
    assert b.label_spec is None and b.scored_values() == ()


def test_only_required_columns_and_extra_columns(data_dir):
    path = _write(data_dir, "moving,name,fixed,notes", "m.png,x,f.png,anything")
    (pair,) = read_manifest(path)
    assert (pair.name, pair.paths["fixed"].name, pair.paths["moving"].name) == ("x", "f.png", "m.png")
    assert pair.paths["fixed_labels"] is None and pair.label_spec is None


def test_label_spec_parse_and_prepare():
    assert LabelSpec.parse("fg") == LabelSpec(fg=True)
    assert LabelSpec.parse(" FG ").fg
    assert LabelSpec.parse("3  1 0").values == (3, 1, 0)
    assert LabelSpec.parse("").empty
    assert str(LabelSpec.parse("1 2")) == "1 2" and str(LabelSpec(fg=True)) == "fg"
    raw = torch.tensor([0, 127, 128, 255], dtype=torch.uint8)
    assert LabelSpec(fg=True).prepare(raw).tolist() == [0, 0, 1, 1]
    assert LabelSpec(values=(1,)).prepare(raw) is raw


# ------------------------------------------------------------------------------ broken manifests
def test_missing_column(data_dir):
    path = _write(data_dir, "name,fixed,fixed_labels", "a,f.png,")
    with pytest.raises(FmregError, match="lacks the required column 'moving'"):
        read_manifest(path)


def test_missing_file_names_pair_and_path(data_dir):
    path = _write(data_dir, HEADER, "a,f.png,m.png,,,,,", "b,f.png,nope.png,,,,,")
    with pytest.raises(FmregError, match="pair 'b': moving file not found: .*nope.png"):
        read_manifest(path)
    path = _write(data_dir, HEADER, "a,f.png,m.png,fl.nii.gz,gone.nii.gz,1,,")
    with pytest.raises(FmregError, match="pair 'a': moving_labels file not found"):
        read_manifest(path)


@pytest.mark.parametrize(
    "labels, message",
    [
        ("1 x", "'x' is not a non-negative integer"),
        ("fg 1", "'fg' is not a non-negative integer"),
        ("-1", "'-1' is not a non-negative integer"),
        ("1.5", "'1.5' is not a non-negative integer"),
        ("1 2 1", "list a value twice"),
        ("", "has label maps but no labels to score"),
    ],
)
def test_bad_labels(data_dir, labels, message):
    path = _write(data_dir, HEADER, f"a,f.png,m.png,fl.nii.gz,ml.nii.gz,{labels},,")
    with pytest.raises(FmregError, match=f"pair 'a'.*{message}"):
        read_manifest(path)


def test_duplicate_name(data_dir):
    path = _write(data_dir, HEADER, "a,f.png,m.png,,,,,", "b,f.png,m.png,,,,,",
                  "a,f.png,m.png,,,,,")
    with pytest.raises(FmregError, match="pair name 'a' is used on lines 2 and 4"):
        read_manifest(path)


@pytest.mark.parametrize(
    "row, message",
    [
        ("a,f.png,m.png,fl.nii.gz,,1,,", "fixed_labels is given but moving_labels is empty"),
        ("a,f.png,m.png,,,,,lm_m.csv", "moving_landmarks is given but fixed_landmarks is empty"),
        ("a,f.png,m.png,,,fg,,", "lists labels 'fg' but has no label maps"),
        ("a,,m.png,,,,,", "the 'fixed' cell is empty"),
        (",f.png,m.png,,,,,", "line 2 has an empty name"),
        ("a,f.png,m.png", "line 2 has 3 fields but the header has 8"),
    ],
)
def test_inconsistent_rows(data_dir, row, message):
    path = _write(data_dir, HEADER, row)
    with pytest.raises(FmregError, match=message):
        read_manifest(path)


def test_missing_or_empty_manifest(tmp_path):
    with pytest.raises(FmregError, match="manifest not found"):
        read_manifest(tmp_path / "none.csv")
    with pytest.raises(FmregError, match="is empty"):
        read_manifest(_write(tmp_path, ""))
    with pytest.raises(FmregError, match="lists no pairs"):
        read_manifest(_write(tmp_path, HEADER))


# ------------------------------------------------------------------------------ landmarks
def test_read_landmarks_2d_and_3d(tmp_path):
    p2 = tmp_path / "a.csv"
    p2.write_text("x,y\n0,0\n10.5, 3\n")
    pts = read_landmarks(p2)
    assert pts.dtype == torch.float64
    assert_close(pts, torch.tensor([[0.0, 0.0], [10.5, 3.0]], dtype=torch.float64))
    p3 = tmp_path / "b.csv"
    p3.write_text(" X , Y , Z \n1,2,3\n")
    assert_close(read_landmarks(p3), torch.tensor([[1.0, 2.0, 3.0]], dtype=torch.float64))


def test_read_landmark_pair(data_dir):
    fixed, moving = read_landmark_pair(data_dir / "lm_f.csv", data_dir / "lm_m.csv")
    assert fixed.shape == moving.shape == (2, 3)
    assert_close(moving[1], torch.tensor([4.0, 5.0, 6.25], dtype=torch.float64))


@pytest.mark.parametrize(
    "text, message",
    [
        ("a,b\n1,2\n", "header must be 'x,y' or 'x,y,z', got 'a,b'"),
        ("y,x\n1,2\n", "header must be"),
        ("x,y,z,w\n1,2,3,4\n", "header must be"),
        ("x,y\n1,abc\n", "line 2: 'abc' is not a finite number"),
        ("x,y\n1,nan\n", "line 2: 'nan' is not a finite number"),
        ("x,y\n1,2\n3\n", "line 3 has 1 values, expected 2"),
        ("x,y\n", "has no points"),
        ("", "is empty"),
    ],
)
def test_read_landmarks_errors(tmp_path, text, message):
    path = tmp_path / "lm.csv"
    path.write_text(text)
    with pytest.raises(FmregError, match=message):
        read_landmarks(path)


def test_landmark_pair_mismatch(tmp_path):
    a, b, c = tmp_path / "a.csv", tmp_path / "b.csv", tmp_path / "c.csv"
    a.write_text("x,y\n1,2\n3,4\n")
    b.write_text("x,y\n1,2\n")
    c.write_text("x,y,z\n1,2,3\n3,4,5\n")
    with pytest.raises(FmregError, match="2 points but moving landmarks .* have 1"):
        read_landmark_pair(a, b)
    with pytest.raises(FmregError, match="are 2D but moving landmarks .* are 3D"):
        read_landmark_pair(a, c)
    with pytest.raises(FmregError, match="landmark file not found"):
        read_landmark_pair(a, tmp_path / "none.csv")


# ------------------------------------------------------------------------------ loading a case
def test_case_load_reads_and_checks_the_files(tmp_path):
    from fmreg import phantoms
    from fmreg.io.images import write_image

    ph = phantoms.make_pair(2, seed=0)
    files = {role: write_image(getattr(ph, role), tmp_path / f"{role}.nii.gz")
             for role in ("fixed", "moving", "fixed_labels", "moving_labels")}
    (tmp_path / "f.csv").write_text("x,y\n1,2\n")
    (tmp_path / "m.csv").write_text("x,y\n1,3\n")
    case = Case.from_files(**files, fixed_landmarks=tmp_path / "f.csv", moving_landmarks=tmp_path / "m.csv")
    assert not case.loaded and case.has_labels and case.has_landmarks and not case.raster
    loaded = case.load()
    assert loaded.loaded and not case.loaded  # load returns a copy
    assert loaded.fixed.grid.same_as(ph.fixed.grid) and loaded.fixed_labels.is_label
    assert torch.equal(loaded.moving_labels.data, ph.moving_labels.data)
    assert loaded.moving_landmarks.tolist() == [[1.0, 3.0]]
    assert list(loaded.paths) == ["fixed", "moving", "fixed_labels", "moving_labels", "fixed_landmarks", "moving_landmarks"]
    with pytest.raises(FmregError, match="give both"):
        Case.from_files(files["fixed"], files["moving"], fixed_landmarks=tmp_path / "f.csv")
    with pytest.raises(FmregError, match="3D but the images are 2D|landmarks are"):
        (tmp_path / "f3.csv").write_text("x,y,z\n1,2,3\n")
        (tmp_path / "m3.csv").write_text("x,y,z\n1,2,3\n")
        Case.from_files(files["fixed"], files["moving"], fixed_landmarks=tmp_path / "f3.csv",
                        moving_landmarks=tmp_path / "m3.csv").load()


def test_binarize_fg_threshold_is_above_127():
    raw = torch.tensor([0, 1, 127, 128, 200, 255], dtype=torch.uint8)
    out = binarize_fg(raw)
    assert out.dtype == torch.int64
    assert out.tolist() == [0, 0, 0, 1, 1, 1]
