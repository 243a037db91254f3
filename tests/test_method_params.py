"""Declared method parameters (issue 12, items 3 and 4): bad ``--param`` values are one-line
errors before any work, and ``fmreg methods [NAME]`` prints the declaration.

CLI calls run in-process through ``fmreg.cli.main``.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

import pytest

from fmreg.cli import main
from fmreg.errors import FmregError
from fmreg.io.images import write_image
from fmreg.methods import available_methods, get_method
from fmreg.methods.base import method_factory
from fmreg.methods.params import Param, check_params, declare


@pytest.fixture(scope="module")
def pair(tmp_path_factory) -> tuple[Path, Path]:
    """A 2D phantom pair on disk (NIfTI)."""
    from fmreg import phantoms

    root = tmp_path_factory.mktemp("pair")
    ph = phantoms.make_pair(2, seed=0)
    write_image(ph.fixed, root / "fixed.nii.gz")
    write_image(ph.moving, root / "moving.nii.gz")
    return root / "fixed.nii.gz", root / "moving.nii.gz"


def _register(pair, out: Path, method: str, *params: str) -> list[str]:
    args = ["register", str(pair[0]), str(pair[1]), "-o", str(out), "--method", method, "-q"]
    for p in params:
        args += ["--param", p]
    return args


def _one_error_line(capsys) -> str:
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert err.startswith("fmreg: error: ") and "\n" not in err, err
    assert "Traceback" not in captured.err + captured.out
    return err[len("fmreg: error: "):]


# ---------------------------------------------------------------------------- bad --param values
@pytest.mark.parametrize("method", ["demons", "samreg", "samreg-labels", "elastix", "ants"])
def test_unknown_parameter_lists_the_methods_parameters(pair, tmp_path, capsys, method):
    out = tmp_path / "out"
    assert main(_register(pair, out, method, "nosuch=1")) == 1
    msg = _one_error_line(capsys)
    names = ", ".join(p.name for p in method_factory(method).PARAMS)
    assert msg == f"unknown parameter 'nosuch' for {method}: choose one of {names}"
    assert not out.exists()


def test_unknown_parameter_for_demons_names_them_all(pair, tmp_path, capsys):
    assert main(_register(pair, tmp_path / "out", "demons", "nosuch=1")) == 1
    assert _one_error_line(capsys) == (
        "unknown parameter 'nosuch' for demons: choose one of shrink_factors, iterations, smoothing_sigma, "
        "field_sigma, update_sigma, max_step, histogram_levels, match_points, physical_smoothing, threads"
    )


def test_unknown_parameter_of_identity_and_a_near_miss(pair, tmp_path, capsys):
    assert main(_register(pair, tmp_path / "out", "identity", "nosuch=1")) == 1
    assert _one_error_line(capsys) == "unknown parameter 'nosuch' for identity: it takes no parameters"
    assert main(_register(pair, tmp_path / "out", "samreg", "treshold=0.5")) == 1
    assert _one_error_line(capsys).startswith("unknown parameter 'treshold' for samreg (did you mean threshold?): ")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "method, param, message",
    [
        ("samreg", "threshold=5",
         "parameter threshold must be in [0, 1], got 5 - cosine similarity a ROI pair must reach (epsilon)"),
        ("samreg", "levels=0", "parameter levels must be >= 1, got 0 - pyramid levels (in-plane factor 2 each)"),
        ("samreg", "lr=0", "parameter lr must be > 0, got 0 - Adam step size, mm of velocity"),
        ("samreg", "verify_dice=-0.1", "parameter verify_dice must be in [0, 1], got -0.1 - "
         "drop ROI pairs whose Dice under the image-only fit is below this (null: keep all)"),
        ("samreg", "iterations=[5, -1, 5, 5]", "parameter iterations must be >= 0 for each value, got [5, -1, 5, 5]"
         " - Adam steps per level, coarsest first (one value, or one per level)"),
        ("samreg", "matching=best", "unknown matching 'best': choose one of greedy, optimal, one_to_many"),
        ("samreg", "image_metric=ssd", "unknown image_metric 'ssd': choose one of auto, mse, lncc, mind"),
        ("samreg-sam", "sam_points_per_side=0",
         "parameter sam_points_per_side must be >= 1, got 0 - prompts per side of SAM's point grid"),
        ("demons", "field_sigma=-1", "parameter field_sigma must be >= 0, got -1 - "
         "smoothing of the field after each iteration (the regularisation), voxels"),
        ("elastix", "maps=[\"affine\", \"spline3\"]",
         "unknown maps 'spline3': choose one of translation, rigid, affine, bspline"),
        # Types are checked first, with the messages they always had.
        ("samreg", "levels=2.5", "parameter levels must be an integer, got 2.5"),
        ("samreg", "threshold=high", "parameter threshold must be a number, got 'high'"),
        ("demons", "iterations=abc", "parameter iterations must be a list of integers or an integer, got 'abc'"),
        ("elastix", "maps=bspline", "parameter maps must be a list of strings, got 'bspline'"),
    ],
)
def test_out_of_range_and_mistyped_values_are_one_line_errors(pair, tmp_path, capsys, method, param, message):
    out = tmp_path / "out"
    assert main(_register(pair, out, method, param)) == 1
    assert _one_error_line(capsys) == message
    assert not out.exists()


def test_nan_is_out_of_every_range():
    with pytest.raises(FmregError, match=r"must be in \[0, 1\], got nan"):
        get_method("samreg", threshold=float("nan"))


def test_values_in_range_and_null_where_allowed_pass():
    m = get_method("samreg", threshold=0, top_k=None, verify_dice=1, iterations=0, matching="optimal")
    assert m.roi_options.threshold == 0 and m.roi_options.matching == "optimal"
    assert get_method("demons", iterations=[0, 0, 1], threads=None).iterations == (0, 0, 1)


# ---------------------------------------------------------------------------- the declarations
@pytest.mark.parametrize("method", available_methods())
def test_every_declared_default_passes_its_own_check(method):
    params = method_factory(method).PARAMS
    assert len({p.name for p in params}) == len(params)
    for p in params:
        assert p.help and "\n" not in p.help
        p.check(p.default)


def test_declarations_follow_the_code_defaults():
    from fmreg.correspond.pairs import SamRegOptions
    from fmreg.optimize.fit import FitOptions

    samreg = {p.name: p for p in method_factory("samreg").PARAMS}
    assert samreg["threshold"].default == SamRegOptions().threshold
    assert samreg["levels"].default == FitOptions().levels
    assert {p.name: p.default for p in method_factory("samreg-sam").PARAMS}["segmenter"] == "sam"
    labels = {p.name: p.default for p in method_factory("samreg-labels").PARAMS}
    assert labels["mse_weight"] == 1.0 and labels["verify_dice"] is None


def test_a_declaration_that_misses_a_field_fails_at_once():
    @dataclass
    class Options:
        a: int = 1
        b: float = 0.5

    with pytest.raises(ValueError, match=r"no range/help for \['b'\]"):
        declare(Options, {"a": (">= 0", "an a")})
    with pytest.raises(ValueError, match="range"):
        Param("x", "float", 0.0, "between 0 and 1", "an x")


def test_check_params_without_the_registry():
    params = (Param("k", "int", 3, ">= 1", "how many"),)
    check_params("toy", params, {"k": 1})
    with pytest.raises(FmregError, match="unknown parameter 'j' for toy: choose one of k"):
        check_params("toy", params, {"j": 1})


# ---------------------------------------------------------------------------- fmreg methods
def test_methods_lists_every_method_with_its_extra(capsys):
    assert main(["methods"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["method", "extra", "installed", "description"]
    rows = {line.split()[0]: line.split() for line in lines[1:] if line.strip()}
    for name in available_methods():
        extra = getattr(method_factory(name), "EXTRA", None)
        if extra is None:
            assert rows[name][1:3] == ["core", "yes"], rows[name]
        else:
            installed = importlib.util.find_spec(extra.module) is not None
            assert rows[name][1:3] == [extra.name, "yes" if installed else "no"], rows[name]
    assert rows["elastix"][1] == "peers" and rows["ants"][1] == "peers" and rows["samreg-sam"][1] == "sam"
    assert rows["demons"][1] == "core"


def test_methods_name_prints_the_parameter_table(capsys):
    assert main(["methods", "samreg"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("samreg: SAMReg")
    header = next(line for line in lines if line.startswith("parameter"))
    assert header.split() == ["parameter", "type", "default", "range", "help"]
    row = next(line for line in lines if line.startswith("threshold "))
    assert row.split()[:5] == ["threshold", "float", "0.8", "in", "[0,"]
    assert "cosine similarity" in row
    # Columns are aligned: every row's default starts where the header's does.
    col = header.index("default")
    for name in ("threshold", "matching", "iterations", "sam_points_per_side"):
        row = next(line for line in lines if line.startswith(name + " "))
        assert row[col - 2:col] == "  " and row[col] != " ", row
    assert any(line.startswith("matching ") and "{greedy, optimal, one_to_many}" in line for line in lines)


def test_methods_of_a_method_without_parameters(capsys):
    assert main(["methods", "identity"]) == 0
    assert "no parameters" in capsys.readouterr().out


def test_methods_unknown_name_is_an_error_line(capsys):
    assert main(["methods", "nosuch"]) == 1
    assert _one_error_line(capsys) == (
        "unknown method 'nosuch': choose one of " + ", ".join(available_methods())
    )
