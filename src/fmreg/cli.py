"""The ``fmreg`` command line: one dataclass per subcommand, parsed with argparse.

Each subcommand is a dataclass whose fields are its arguments (declared with :func:`arg`) and
whose :meth:`Command.run` calls one function of :mod:`fmreg.app` (``register``, ``warp``,
``jacobian``, ``evaluate``, ``bench``, ``demo``; ``train`` is in :mod:`fmreg.cli_train`, the
base in :mod:`fmreg.cli_base`). Nothing here computes anything.

Errors the user can cause are :class:`~fmreg.errors.FmregError`: :func:`main` prints them as
one ``fmreg: error: ...`` line and returns 1; Ctrl-C returns 130. Any other exception is a bug
and keeps its traceback.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Sequence

from fmreg import __version__
from fmreg.errors import FmregError
from fmreg.app.common import DEFAULT_METHOD
from fmreg.cli_base import PROG, Command, arg
from fmreg.cli_base import fmt as _fmt
from fmreg.cli_train import Train


# ---------------------------------------------------------------------------- register
@dataclass(kw_only=True)
class Register(Command):
    """Register MOVING onto FIXED (find T with warped(x) = moving(T(x)) on the fixed grid).

Writes into OUTDIR: warped.nii.gz (warped.png for picture input), ddf.nii.gz (ITK displacement
field, fixed->moving, mm), warped_labels.* (with --moving-labels), result.json (method,
parameters, seconds, peak memory, grid, metrics), overview.png, and the method's own pictures.
Label maps are used for scoring only, unless the method is label-based.

Without --labels, a 0..255 mask containing 255 is scored as 'fg' (foreground = value > 127,
reported as label 1); any other label map scores every non-zero value in the fixed labels."""

    name: ClassVar[str] = "register"
    help: ClassVar[str] = "register two images and write the warped image, field, metrics, pictures"
    fixed: Path = arg(help="fixed image (NIfTI/NRRD/MHA, PNG/JPG/TIF, NPY/NPZ)", type=Path)
    moving: Path = arg(help="moving image, same dimensionality as FIXED", type=Path)
    outdir: Path = arg("-o", "--outdir", help="output folder (created if missing)", type=Path, required=True, metavar="OUTDIR")
    method: str | None = arg("-m", "--method", help="registration method (default: " + DEFAULT_METHOD + ")", metavar="M")
    fixed_labels: Path | None = arg("--fixed-labels", help="label map on the fixed grid", type=Path, metavar="F")
    moving_labels: Path | None = arg("--moving-labels", help="label map on the moving grid", type=Path, metavar="M")
    label_values: str | None = arg("--labels", help="label values to score, e.g. \"1 2 3\", or fg (value > 127)", metavar="VALUES")
    fixed_landmarks: Path | None = arg("--fixed-landmarks", help="landmark CSV (x,y pixels or x,y,z mm)", type=Path, metavar="CSV")
    moving_landmarks: Path | None = arg("--moving-landmarks", help="matching moving landmark CSV", type=Path, metavar="CSV")
    overwrite: bool = arg("--overwrite", help="replace existing files even in an input's folder, and remove fmreg's own earlier outputs this run does not write", default=False, action="store_true")
    param: list[str] | None = arg("--param", help="method parameter key=value (repeat the option for several)", action="append", metavar="KEY=VALUE")

    def run(self) -> int:
        from fmreg.app.common import parse_params
        from fmreg.app.register import register

        outcome = register(
            self.fixed,
            self.moving,
            self.outdir,
            method=self.method or DEFAULT_METHOD,
            params=parse_params(self.param),
            fixed_labels=self.fixed_labels,
            moving_labels=self.moving_labels,
            label_values=self.label_values,
            fixed_landmarks=self.fixed_landmarks,
            moving_landmarks=self.moving_landmarks,
            overwrite=self.overwrite,
            log=self.log,
        )
        mets = outcome.doc["metrics"]
        parts = [f"{outcome.doc['method']}: {outcome.seconds:.2f} s", f"folding {_fmt(mets.get('folding_pct'))} %"]
        if "mean_dice" in mets:
            parts.insert(1, f"mean Dice {_fmt(mets['mean_dice'])}")
        if "landmark_tre" in mets:
            parts.insert(2, f"landmark TRE {_fmt(mets['landmark_tre']['mean'], 2)}")
        print(", ".join(parts))
        print(f"outputs in {Path(self.outdir).resolve()}")
        return 0


# ---------------------------------------------------------------------------- warp
@dataclass(kw_only=True)
class Warp(Command):
    """Warp MOVING onto the grid of REFERENCE with a displacement field written by register
(warped(x) = moving(x + u(x)))."""

    name: ClassVar[str] = "warp"
    help: ClassVar[str] = "apply a displacement field to an image or label map"
    moving: Path = arg(help="image or label map to warp", type=Path)
    ddf: Path = arg(help="displacement field (ddf.nii.gz)", type=Path)
    reference: Path = arg("-r", "--reference", help="the fixed image (grid of the field)", type=Path, required=True)
    output: Path = arg("-o", "--output", help="output file (.nii.gz, or .png for 2D)", type=Path, required=True)
    is_label: bool = arg("--labels", help="MOVING is a label map: nearest neighbour, values kept", default=False, action="store_true")
    smooth: bool = arg("--smooth", help="with --labels: per-label linear interpolation, each voxel takes the label of largest weight (smoother boundaries)", default=False, action="store_true")
    overwrite: bool = arg("--overwrite", help="replace an existing file in an input's folder", default=False, action="store_true")

    def run(self) -> int:
        from fmreg.app.warp import warp_file

        out = warp_file(self.moving, self.ddf, self.reference, self.output, is_label=self.is_label, smooth=self.smooth, overwrite=self.overwrite, log=self.log)
        print(out)
        return 0


# ---------------------------------------------------------------------------- jacobian
@dataclass(kw_only=True)
class Jacobian(Command):
    """Jacobian determinant of the transform of a displacement field (physical units).

A .nii.gz OUTPUT gets the values and a PNG picture beside it; a .png OUTPUT the picture only.
Values <= 0 are folds."""

    name: ClassVar[str] = "jacobian"
    help: ClassVar[str] = "Jacobian determinant map of a displacement field"
    ddf: Path = arg(help="displacement field (ddf.nii.gz)", type=Path)
    output: Path = arg("-o", "--output", help="output .nii.gz (values + picture) or .png (picture)", type=Path, required=True)
    overwrite: bool = arg("--overwrite", help="replace an existing file in an input's folder", default=False, action="store_true")

    def run(self) -> int:
        from fmreg.app.jacobian import jacobian_file

        s = jacobian_file(self.ddf, self.output, overwrite=self.overwrite, log=self.log)
        print(f"det J in [{s['min']:.3f}, {s['max']:.3f}], folding {s['folding_pct']:.3f} %, std log|J| {s['std_log_jacobian']:.4f}")
        for p in s["outputs"]:
            print(p)
        return 0


# ---------------------------------------------------------------------------- evaluate
@dataclass(kw_only=True)
class Evaluate(Command):
    """Score a registration result: Dice, HD95, ASD and centroid TRE per label (plus means);
with --ddf also folding % and std log|J|, and landmark TRE given landmarks."""

    name: ClassVar[str] = "evaluate"
    help: ClassVar[str] = "metrics of warped labels against fixed labels and landmarks"
    fixed_labels: Path = arg("--fixed-labels", help="fixed label map", type=Path, required=True, metavar="F")
    warped_labels: Path = arg("--warped-labels", help="moving labels warped onto the fixed grid", type=Path, required=True, metavar="W")
    label_values: str | None = arg("--labels", help="label values to score, e.g. \"1 2 3\", or fg", metavar="VALUES")
    ddf: Path | None = arg("--ddf", help="the registration's displacement field", type=Path)
    fixed_landmarks: Path | None = arg("--fixed-landmarks", help="landmark CSV of the fixed image", type=Path, metavar="CSV")
    moving_landmarks: Path | None = arg("--moving-landmarks", help="landmark CSV of the moving image", type=Path, metavar="CSV")
    moving_image: Path | None = arg("--moving-image", help="moving image, to place 2D pixel landmarks on a non-unit grid", type=Path, metavar="IMG")
    output: Path | None = arg("-o", "--output", help="write the metrics as JSON here", type=Path)
    overwrite: bool = arg("--overwrite", help="replace an existing file in an input's folder", default=False, action="store_true")

    def run(self) -> int:
        from fmreg.app.evaluate import evaluate_files

        doc = evaluate_files(
            self.fixed_labels,
            self.warped_labels,
            label_values=self.label_values,
            ddf=self.ddf,
            fixed_landmarks=self.fixed_landmarks,
            moving_landmarks=self.moving_landmarks,
            moving_image=self.moving_image,
            output=self.output,
            overwrite=self.overwrite,
            log=self.log,
        )
        m = doc["metrics"]
        if "dice" in m:
            print("label  dice    hd95    asd     centroid_tre")
            for k in m["dice"]:
                print(f"{k:<6} {_fmt(m['dice'][k])}  {_fmt(m['hd95'][k], 2):<7} {_fmt(m['asd'][k], 2):<7} {_fmt(m['centroid_tre'][k], 2)}")
            print(f"mean   {_fmt(m['mean_dice'])}  {_fmt(m['mean_hd95'], 2):<7} {_fmt(m['mean_asd'], 2):<7} {_fmt(m['mean_centroid_tre'], 2)}")
        if "landmark_tre" in m:
            t = m["landmark_tre"]
            print(f"landmark TRE mean {_fmt(t['mean'], 2)}, median {_fmt(t['median'], 2)}, max {_fmt(t['max'], 2)} {t['units']}")
        if "folding_pct" in m:
            print(f"folding {_fmt(m['folding_pct'])} %, std log|J| {_fmt(m['std_log_jacobian'], 4)}")
        return 0


# ---------------------------------------------------------------------------- bench
@dataclass(kw_only=True)
class Bench(Command):
    """Register every pair of MANIFEST with each method; write OUTDIR/results.csv, results.md and
per-pair outputs under OUTDIR/<method>/<pair>/.

results.csv columns: name, method, dice_mean, dice_<value>..., hd95_mean, tre_mean, tre_median,
folding_pct, std_log_jacobian, seconds, peak_mem_mb (empty = no ground truth). TRE is landmark TRE where a pair
has landmarks, else centroid TRE."""

    name: ClassVar[str] = "bench"
    help: ClassVar[str] = "benchmark methods on a pair manifest"
    manifest: Path = arg(help="pair manifest CSV (name, fixed, moving, labels, ...)", type=Path)
    method: list[str] | None = arg("-m", "--method", help="method to run (repeatable; default: " + DEFAULT_METHOD + ")", action="append", metavar="M")
    outdir: Path = arg("-o", "--outdir", help="output folder", type=Path, required=True, metavar="OUTDIR")
    pairs: list[str] | None = arg("--pairs", help="only these pair names", nargs="+", metavar="NAME")
    param: list[str] | None = arg("--param", help="method parameter key=value, for every method of the run that takes it (repeatable)", action="append", metavar="KEY=VALUE")
    overwrite: bool = arg("--overwrite", help="replace existing files even in an input's folder, and remove fmreg's own earlier results (tables, per-pair folders) this run does not write", default=False, action="store_true")

    def run(self) -> int:
        from fmreg.app.bench import method_means, run_bench
        from fmreg.app.common import parse_params

        res = run_bench(
            self.manifest,
            self.method or [DEFAULT_METHOD],
            self.outdir,
            pairs=self.pairs,
            overwrite=self.overwrite,
            log=self.log,
            progress=not self.quiet,
            params=parse_params(self.param),
        )
        for m in method_means(res):
            print(
                f"{m['method']}: mean Dice {_fmt(m['dice_mean'])}, folding {_fmt(m['folding_pct'])} %, "
                f"{_fmt(m['seconds'], 2)} s per pair over {m['pairs']} pairs, "
                f"peak memory up to {_fmt(m['peak_mem_mb_max'], 0)} MiB"
            )
        print(f"tables: {res.outdir / 'results.csv'}, {res.outdir / 'results.md'}")
        return 0


# ---------------------------------------------------------------------------- demo
@dataclass(kw_only=True)
class Demo(Command):
    """Generate a 2D and a 3D phantom pair (synthetic, deformed by a known smooth field),
register them and print where the pictures are, with the Dice before and after."""

    name: ClassVar[str] = "demo"
    help: ClassVar[str] = "register built-in example data"
    outdir: Path = arg("-o", "--outdir", help="output folder (default: ./fmreg-demo)", type=Path, default=Path("fmreg-demo"), metavar="OUTDIR")
    method: str | None = arg("-m", "--method", help="registration method (default: " + DEFAULT_METHOD + ")", metavar="M")
    param: list[str] | None = arg("--param", help="method parameter key=value (repeat the option for several)", action="append", metavar="KEY=VALUE")

    def run(self) -> int:
        from fmreg.app.common import parse_params
        from fmreg.app.demo import demo

        for s in demo(self.outdir, method=self.method or DEFAULT_METHOD, params=parse_params(self.param), log=self.log):
            print(
                f"{s['ndim']}D phantom: mean Dice {_fmt(s['dice_before'])} before -> {_fmt(s['dice_after'])} after, "
                f"field error {_fmt(s['field_error_mm'], 2)} mm vs the known deformation ({s['seconds']:.1f} s)"
            )
            for p in s["pictures"]:
                print(f"  {p}")
        return 0


# ---------------------------------------------------------------------------- methods
@dataclass(kw_only=True)
class Methods(Command):
    """List the registration methods: name, the extra each needs and whether it is installed,
and what it is. With NAME: that method's parameters (type, default, allowed range, help), the
keys of --param KEY=VALUE."""

    name: ClassVar[str] = "methods"
    help: ClassVar[str] = "list the methods, or one method's parameters"
    method: str | None = arg(help="the method whose parameters to list", nargs="?", metavar="NAME")

    def run(self) -> int:
        from fmreg.app.methods import describe_method, list_methods

        print("\n".join(list_methods() if self.method is None else describe_method(self.method)))
        return 0


@dataclass(kw_only=True)
class KnownPairs(Command):
    """Cut benchmark pairs with known transforms from 2D images: per SOURCE and seed, the fixed
image is the source resampled through a random similarity (by default rotation up to 20°, scale
0.9-1.1, shift up to 15 % of the image) plus a smooth local field, the moving image its central
crop. Smaller moves (e.g. --max-shift 0.03 --max-angle 5 --scale 0.95 1.05) test what a
registration network is made for.

Writes into OUTDIR: pairs.csv, and per pair <name>_fixed.nii.gz, _moving.nii.gz, landmark CSVs
(a grid of fixed points and their true moving positions) and _true_ddf.nii.gz (the true
fixed->moving field, mm). Then `fmreg bench OUTDIR/pairs.csv -m samreg -m elastix ...` scores
each method's landmark TRE against the known transform."""

    name: ClassVar[str] = "known-pairs"
    help: ClassVar[str] = "make benchmark pairs with known transforms from 2D images"
    sources: list[Path] = arg(help="2D images (textures of the pairs)", type=Path, nargs="+", metavar="SOURCE")
    outdir: Path = arg("-o", "--outdir", help="output folder", type=Path, required=True, metavar="OUTDIR")
    seeds: list[int] = arg("--seeds", help="one pair per seed and source (default: 1 2)", type=int, nargs="+",
                           default=None, metavar="N")
    local_mm: float = arg("--local-mm", help="largest component of the local field, mm (default 3)", type=float,
                          default=3.0)
    overwrite: bool = arg("--overwrite", help="replace earlier outputs in a source image's folder", default=False,
                          action="store_true")
    aperture: float | None = arg("--aperture", help="see both images through one centred disc of this radius "
                                 "(fraction of the smaller side, at most 0.5) that stays put, as a camera's",
                                 type=float, default=None, metavar="R")
    max_shift: float = arg("--max-shift", help="largest shift along x and y, fraction of the image (default 0.15)",
                           type=float, default=None, metavar="F")
    max_angle: float = arg("--max-angle", help="largest rotation, degrees (default 20)", type=float, default=None,
                           metavar="DEG")
    scale: list[float] = arg("--scale", help="range of the scale (default 0.9 1.1)", type=float, nargs=2,
                             default=None, metavar=("LOW", "HIGH"))

    def run(self) -> int:
        from fmreg.app.known_pairs import write_known_pairs

        # Unset bounds take write_known_pairs' defaults (fmreg.evaluate.known_transforms).
        given = {"max_shift": self.max_shift, "max_angle": self.max_angle,
                 "scale_range": tuple(self.scale) if self.scale else None}
        bounds = {k: v for k, v in given.items() if v is not None}
        path = write_known_pairs(self.sources, self.outdir, self.seeds or [1, 2], self.local_mm, self.overwrite,
                                 self.log, aperture=self.aperture, **bounds)
        print(f"known-transform pairs: {path}")
        return 0


COMMANDS: tuple[type[Command], ...] = (Register, Warp, Jacobian, Evaluate, Bench, Demo, Methods, Train, KnownPairs)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Medical image registration with vision foundation models. Transforms map "
        "fixed-image points to moving-image points (T(x) = x + u(x)); fields are ITK "
        "displacement fields in mm.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="subcommand", metavar="COMMAND", required=True)
    for cmd in COMMANDS:
        cmd.add_to(sub)
    return parser


def _one_line_warning(message, category, filename, lineno, file=None, line=None) -> None:
    # Library warnings as one line, like every other fmreg message on stderr.
    print(f"[fmreg] warning: {' '.join(str(message).split())}", file=file or sys.stderr, flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``fmreg`` command line; returns the exit status.

    Args:
        argv: Arguments without the program name (default: ``sys.argv[1:]``).
    """
    parser = build_parser()
    args = vars(parser.parse_args(argv))
    cls: type[Command] = args.pop("command")
    args.pop("subcommand", None)
    command = cls(**args)
    command.argv = list(sys.argv[1:] if argv is None else argv)
    old_showwarning = warnings.showwarning
    warnings.showwarning = _one_line_warning
    try:
        import SimpleITK as sitk

        # ITK prints multi-line warnings for headers it reads correctly anyway (e.g. ACDC's
        # unit-scale sform, see fmreg.io.images); they would drown the progress lines.
        sitk.ProcessObject.SetGlobalWarningDisplay(False)
        return command.run()
    except FmregError as exc:
        msg = " ".join(str(exc).split()) or type(exc).__name__
        print(f"{PROG}: error: {msg}", file=sys.stderr, flush=True)
        return 1
    except OSError as exc:
        # The environment, not fmreg, failed (disk full, permission denied on an output
        # folder): say which file, in one line. Reading errors are FmregError already.
        where = f": {exc.filename}" if getattr(exc, "filename", None) else ""
        print(f"{PROG}: error: {exc.strerror or exc}{where}", file=sys.stderr, flush=True)
        return 1
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr, flush=True)
        return 130
    finally:
        warnings.showwarning = old_showwarning


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
