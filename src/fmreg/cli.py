"""The ``fmreg`` command line: one dataclass per subcommand, parsed with argparse.

Each subcommand is a dataclass whose fields are its arguments (declared with :func:`arg`) and
whose :meth:`Command.run` calls one function of :mod:`fmreg.app` (``register``, ``warp``,
``jacobian``, ``evaluate``, ``bench``, ``demo``). Nothing here computes anything.

Errors the user can cause are :class:`~fmreg.errors.FmregError`: :func:`main` prints them as
one ``fmreg: error: ...`` line and returns 1; Ctrl-C returns 130. Any other exception is a bug
and keeps its traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import shlex
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Sequence

from fmreg import __version__
from fmreg.errors import FmregError
from fmreg.app.common import DEFAULT_METHOD

PROG = "fmreg"


def arg(*flags: str, help: str, default: Any = None, **kwargs: Any) -> Any:
    """Declare a command-line argument as a dataclass field.

    Args:
        flags: Option strings (``"-o", "--outdir"``); none for a positional argument.
        help: Help text.
        default: Default value (also the dataclass default).
        kwargs: Further :meth:`argparse.ArgumentParser.add_argument` keywords.
    """
    return field(default=default, metadata={"flags": flags, "help": help, "kwargs": kwargs})


@dataclass(kw_only=True)
class Command:
    """Base of the subcommands: ``name``/``help`` name it, fields declared with :func:`arg`."""

    name: ClassVar[str] = ""
    help: ClassVar[str] = ""
    quiet: bool = False
    #: The arguments as given (for records such as a model card's command line).
    argv: list[str] = field(default_factory=list)

    @classmethod
    def add_to(cls, subparsers) -> None:
        doc = (cls.__doc__ or "").strip()
        p = subparsers.add_parser(
            cls.name, help=cls.help, description=doc, formatter_class=argparse.RawDescriptionHelpFormatter
        )
        for f in dataclasses.fields(cls):
            if "flags" not in f.metadata:
                continue
            flags, kwargs = f.metadata["flags"], dict(f.metadata["kwargs"])
            if flags:
                p.add_argument(*flags, dest=f.name, help=f.metadata["help"], default=f.default, **kwargs)
            else:
                kwargs.setdefault("metavar", f.name.upper())
                p.add_argument(f.name, help=f.metadata["help"], **kwargs)
        p.add_argument("-q", "--quiet", action="store_true", help="no progress lines on stderr")
        p.set_defaults(command=cls)

    @property
    def log(self):
        from fmreg.app.common import quiet_log, stderr_log

        return quiet_log if self.quiet else stderr_log

    def run(self) -> int:  # pragma: no cover - abstract
        raise NotImplementedError


def _fmt(v: Any, digits: int = 3) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "n/a"
    return f"{v:.{digits}f}"


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


# ---------------------------------------------------------------------------- train
@dataclass(kw_only=True)
class Train(Command):
    """Train or fine-tune a registration network into RUN_DIR: GradICON (paper 000, the default) or
the mask-guided network (paper 001, --model mask-guided).

RUN_DIR gets checkpoint.pt (every --checkpoint-every steps, atomic; --resume continues it bit for
bit), loss.png and model.json (data, command, optimizer, steps, wall time, machine). Data:
synthetic SynthMorph-style pairs (--synthetic 2d|3d) and/or the pairs of --manifest CSVs.
More processes: torchrun --nproc_per_node N -m fmreg train ... (DistributedDataParallel)."""

    name: ClassVar[str] = "train"
    help: ClassVar[str] = "train or fine-tune a registration network (gradicon, mask-guided)"
    outdir: Path = arg("-o", "--outdir", help="run folder", type=Path, required=True, metavar="RUN_DIR")
    model: str = arg("--model", help="gradicon (paper 000) or mask-guided (paper 001)", default="gradicon",
                     choices=("gradicon", "mask-guided"))
    mask_channels: int = arg("--mask-channels", help="mask-guided: ROI mask channels K", type=int, default=4, metavar="K")
    fusion: str = arg("--fusion", help="mask-guided: cross-fusion attention or convolutional fusion", default="attention",
                      choices=("attention", "conv"))
    squaring_steps: int = arg("--squaring-steps", help="mask-guided: each level outputs a velocity integrated in N "
                              "scaling-and-squaring steps (diffeomorphic; default 7); 0, a displacement (the "
                              "published code's)", type=int, default=7, metavar="N")
    mask_source: str = arg("--mask-source", help="mask-guided: training masks from the synthetic label maps, "
                           "the classical segmenter's ROI pairs, or either per pair", default="mixed",
                           choices=("labels", "segmenter", "mixed"))
    no_mask_inputs: bool = arg("--no-mask-inputs", help="mask-guided: the network sees empty mask channels "
                               "(images-only baseline; the masks still enter the losses)", default=False, action="store_true")
    loss_weight: list[str] | None = arg("--loss-weight", help="mask-guided: a loss weight (repeatable), e.g. contour=0; "
                                        "names: ncc diffusion dice contour contrastive alignment", action="append", metavar="NAME=VALUE")
    manifest: list[str] | None = arg("--manifest", help="training pairs (repeatable; labels are not used)", action="append", metavar="CSV")
    synthetic: str | None = arg("--synthetic", help="synthetic pairs of this dimension", choices=("2d", "3d"))
    labelled: list[str] | None = arg("--labelled", help="labelled images whose deformed copies make training pairs "
                                     "(repeatable): PATH.npz with arrays vol and seg, or IMAGE,LABELS; 2D models "
                                     "take random slices of 3D images", action="append", metavar="SPEC")
    labelled_share: float | None = arg("--labelled-share", help="share of each batch from --labelled (default 0.5 "
                                       "with other data, else 1)", type=float, metavar="F")
    synthetic_share: float | None = arg("--synthetic-share", help="share of synthetic pairs per batch with --manifest (default 0.5)", type=float, metavar="F")
    init: str | None = arg("--init", help="start from these weights (fmreg checkpoint or uniGradICON's regis_net)", metavar="WEIGHTS")
    optimizer: str = arg("--optimizer", help="adam, sharpness-aware (SAM) or adaptive-sharpness-aware (ASAM)", default="adam",
                         choices=("adam", "sharpness-aware", "adaptive-sharpness-aware"))
    rho: float | None = arg("--rho", help="ascent radius (default 0.05 SAM, 0.5 ASAM)", type=float, metavar="R")
    steps: int | None = arg("--steps", help="optimisation steps (default 1000; on --resume a new total)", type=int, metavar="N")
    size: list[int] | None = arg("--size", help="network input size, array order (default 128 128 in 2D, 128 128 128 in 3D)", type=int, nargs="+", metavar="N")
    width: float | None = arg("--width", help="multiplier of the model's widths (gradicon: uniGradICON's, 1 = the 70.7 M model, default 0.25; mask-guided: the paper's 8-16-32-64, default 1)", type=float, metavar="W")
    depth: int = arg("--depth", help="U-Net levels (uniGradICON: 5)", type=int, default=5, metavar="L")
    batch: int = arg("--batch", help="pairs per step over all processes", type=int, default=8, metavar="B")
    lr: float = arg("--lr", help="Adam learning rate", type=float, default=1e-3)
    similarity: str = arg("--similarity", help="lncc (uniGradICON), squared-lncc (contrast-sign blind) or mind-ssc "
                          "(MIND-SSC descriptors: contrast-independent)", default="lncc",
                          choices=("lncc", "squared-lncc", "mind-ssc"))
    seed: int = arg("--seed", help="seed of weights, data and sample points", type=int, default=0)
    checkpoint_every: int = arg("--checkpoint-every", help="steps between checkpoints", type=int, default=100, metavar="K")
    validate: str | None = arg("--validate", help="score this manifest's labelled pairs (Dice, folding) during training", metavar="CSV")
    validate_every: int = arg("--validate-every", help="steps between validations (with --validate)", type=int, default=100, metavar="K")
    resume: bool = arg("--resume", help="continue the run in RUN_DIR", default=False, action="store_true")
    overwrite: bool = arg("--overwrite", help="start over in a RUN_DIR that holds another run", default=False, action="store_true")

    def config(self):
        from fmreg.errors import FmregError
        from fmreg.training.config import TrainConfig

        if not self.synthetic and not self.manifest and not self.labelled:
            raise FmregError("give training data: --synthetic 2d|3d, --labelled SPEC and/or --manifest CSV")
        dim = int(self.synthetic[0]) if self.synthetic else (len(self.size) if self.size else 2)
        share = 1.0 if not self.manifest else (0.0 if not self.synthetic else (0.5 if self.synthetic_share is None else self.synthetic_share))
        alone = not self.synthetic and not self.manifest
        labelled_share = 1.0 if alone else (0.5 if self.labelled_share is None else self.labelled_share)
        width = self.width if self.width is not None else (1.0 if self.model == "mask-guided" else 0.25)
        return TrainConfig(model=self.model, mask_channels=self.mask_channels, fusion=self.fusion,
                           squaring_steps=self.squaring_steps,
                           mask_source=self.mask_source, mask_inputs=not self.no_mask_inputs,
                           labelled=list(self.labelled or []), labelled_share=labelled_share,
                           loss_weights=self._loss_weights(),
                           dimension=dim, size=tuple(self.size or (128,) * dim), width=width,
                           unet_levels=self.depth, optimizer=self.optimizer, rho=self.rho, lr=self.lr,
                           similarity=self.similarity,
                           batch_size=self.batch, steps=1000 if self.steps is None else self.steps,
                           checkpoint_every=self.checkpoint_every,
                           seed=self.seed, synthetic=share, manifests=list(self.manifest or []), init=self.init,
                           validation=self.validate, validate_every=self.validate_every if self.validate else 0)

    def _loss_weights(self) -> dict[str, float]:
        from fmreg.errors import FmregError

        weights = {}
        for item in self.loss_weight or []:
            name, _, value = item.partition("=")
            try:
                weights[name.strip()] = float(value)
            except ValueError:  # no "=" leaves value empty: not a number either
                raise FmregError(f"--loss-weight takes NAME=VALUE (e.g. contour=0), got '{item}'") from None
        return weights

    def run(self) -> int:
        from fmreg.app.train import train

        card = train(self.outdir, None if self.resume else self.config(), resume=self.resume,
                     overwrite=self.overwrite, steps=self.steps, log=self.log, quiet=self.quiet,
                     command=shlex.join([PROG, *self.argv]))
        last = card["final_loss"]
        print(f"{card['steps']} steps in {card['wall_time_s']:.0f} s, last loss {last.get('loss', float('nan')):.4f}: "
              f"{self.outdir / 'model.json'}")
        return 0


COMMANDS: tuple[type[Command], ...] = (Register, Warp, Jacobian, Evaluate, Bench, Demo, Methods, Train)


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
