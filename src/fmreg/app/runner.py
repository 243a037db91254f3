"""The functional core behind ``fmreg register``, ``warp``, ``jacobian``, ``evaluate`` and ``demo``.

Every public function here takes paths and plain values, raises :class:`~fmreg.errors.FmregError`
for anything the user can cause, and writes its outputs *atomically*: all files go into a
hidden staging folder beside the destination (see :class:`Staging`) and are moved into place
only after every one of them was written, so a failure leaves no partial output behind.
The CLI (:mod:`fmreg.cli`) only parses arguments and calls these functions.

Measures reported for every registration (``result.json``, ``results.csv``):

* ``seconds``: wall time of ``method.register`` only (reading, warping, scoring and writing
  are excluded, so methods are compared on their own work).
* ``peak_mem_mb``: increase of the process's peak resident set size during
  ``method.register``, in MiB. On Linux the kernel's high-water mark ``VmHWM`` is reset to the
  current RSS through ``/proc/self/clear_refs`` just before the call, and the increase is
  ``VmHWM`` after the call minus ``VmRSS`` before it; this counts every allocation that touched
  memory (Python, NumPy, torch, native libraries, all threads). Where ``clear_refs`` is not
  available the growth of ``getrusage().ru_maxrss`` is reported instead, which reads 0 when the
  process had reached a higher peak earlier (``peak_mem_measure`` in ``result.json`` names the
  measure used).

Label values scored when none are given (``--labels`` absent, see :func:`default_label_spec`):
a fixed label map whose values all lie in 0..255 and include 255 is a rendered binary mask
(the PNG masks of the shared data are 0/255, some anti-aliased): it is scored as ``fg``, i.e.
foreground = value > 127, reported as label 1. Any other map scores every non-zero value present
in the fixed label map.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import resource
import shutil
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
from torch import Tensor

from fmreg import __version__
from fmreg.errors import FmregError
from fmreg.transforms.displacement import DisplacementField, jacobian_determinant, sample, warp, warp_labels
from fmreg.core.grid import Frame, Grid
from fmreg.core.image import Image, check_label_grid, check_pair
from fmreg.io.images import is_2d_raster, read_field, read_image, suffix_of, write_field, write_image
from fmreg.io.manifest import LabelSpec, read_landmark_pair
from fmreg.methods.base import Method, RegistrationResult, get_method
from fmreg.evaluate import metrics

#: The method ``register``, ``bench`` and ``demo`` use when none is named.
DEFAULT_METHOD = "samreg"

Log = Callable[[str], None]


def stderr_log(message: str) -> None:
    """Print one progress line (``[fmreg] ...``) to stderr."""
    print(f"[fmreg] {message}", file=sys.stderr, flush=True)


def quiet_log(message: str) -> None:
    """A log that says nothing."""


# ---------------------------------------------------------------------------- small helpers
def absolute(path: str | os.PathLike) -> Path:
    """Absolute path without resolving symlinks."""
    # abspath, not resolve(): keep symlinked data folders as the user named them in messages.
    return Path(os.path.abspath(os.fspath(path)))


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.exists() and b.exists() and os.path.samefile(a, b)
    except OSError:
        return False


def _is_same_path(a: Path, b: Path) -> bool:
    return absolute(a) == absolute(b) or _same_file(a, b)


def _fmt_seconds(seconds: float) -> str:
    return f"{seconds:.1f} s" if seconds >= 0.1 else f"{seconds * 1000:.0f} ms"


def parse_params(items: Sequence[str] | None) -> dict[str, Any]:
    """Parse ``key=value`` method parameters; values are read as JSON when they parse
    (numbers, ``true``/``false``, lists) and kept as strings otherwise.

    Raises:
        FmregError: When an item has no ``=`` or an empty key.
    """
    params: dict[str, Any] = {}
    for item in items or ():
        key, sep, value = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not key:
            raise FmregError(f"--param {item!r}: write parameters as key=value, e.g. --param iterations=50")
        try:
            params[key] = json.loads(value)
        except json.JSONDecodeError:
            params[key] = value
    return params


def make_method(name: str, params: dict[str, Any] | None = None) -> Method:
    """Instantiate a registered method, turning a rejected parameter into a user error."""
    params = dict(params or {})
    try:
        return get_method(name, **params)
    except TypeError as exc:
        if "argument" in str(exc):
            raise FmregError(f"method '{name}' does not accept the given parameters ({exc})") from None
        raise


def to_jsonable(value: Any) -> Any:
    """A JSON-ready copy of ``value``: NaN/Inf become ``null`` (JSON has no NaN), tensors and
    arrays become lists, paths strings, dict keys strings."""
    if isinstance(value, dict):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set)):
        return [to_jsonable(v) for v in value]
    if isinstance(value, Tensor):
        return to_jsonable(value.detach().cpu().tolist())
    if isinstance(value, np.ndarray):
        return to_jsonable(value.tolist())
    if isinstance(value, np.generic):
        return to_jsonable(value.item())
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, (str, int, bool)) or value is None:
        return value
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if hasattr(value, "to_dict"):
        return to_jsonable(value.to_dict())
    return str(value)


def dump_json(doc: dict) -> str:
    return json.dumps(to_jsonable(doc), indent=2, allow_nan=False) + "\n"


@contextlib.contextmanager
def logged_warnings(log: Log) -> Iterator[None]:
    """Report Python warnings raised inside the block (e.g. NaN metrics of an empty label) as
    one ``warning: ...`` log line each instead of the two-line default format."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield
    seen = set()
    for w in caught:
        msg = " ".join(str(w.message).split())
        if msg not in seen:
            seen.add(msg)
            log(f"warning: {msg}")


# ---------------------------------------------------------------------------- peak memory
def _proc_status_kib(key: str) -> int | None:
    try:
        with open("/proc/self/status") as fh:
            m = re.search(rf"^{key}:\s+(\d+)\s+kB", fh.read(), re.MULTILINE)
    except OSError:
        return None
    return int(m.group(1)) if m else None


def _release_free_heap() -> None:
    # Memory freed by earlier work stays in the process (glibc keeps freed heap pages), so a
    # method reusing it would show no RSS growth; hand it back to the OS first so the baseline
    # is the memory actually in use.
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class PeakMemory:
    """Context manager measuring the peak RSS increase of the block (see the module notes).

    Attributes:
        mb: Peak increase in MiB after the block (``None`` when nothing could be measured).
        measure: Which measure was used, for reports.
    """

    def __init__(self) -> None:
        self.mb: float | None = None
        self.measure = "none"
        self._base_kib: int | None = None
        self._hwm_reset = False

    def __enter__(self) -> "PeakMemory":
        _release_free_heap()
        try:
            with open("/proc/self/clear_refs", "w") as fh:
                fh.write("5")  # 5 = reset the peak RSS (VmHWM) to the current RSS
            self._hwm_reset = True
        except OSError:
            self._hwm_reset = False
        if self._hwm_reset:
            self._base_kib = _proc_status_kib("VmRSS")
        else:
            self._base_kib = self._maxrss_kib()
        return self

    @staticmethod
    def _maxrss_kib() -> int:
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return rss // 1024 if sys.platform == "darwin" else rss  # bytes on macOS, KiB elsewhere

    def __exit__(self, *exc) -> None:
        if self._hwm_reset:
            hwm = _proc_status_kib("VmHWM")
            if hwm is not None and self._base_kib is not None:
                self.mb = max(hwm - self._base_kib, 0) / 1024.0
                self.measure = "VmHWM increase (Linux /proc, reset via clear_refs)"
        elif self._base_kib is not None:
            self.mb = max(self._maxrss_kib() - self._base_kib, 0) / 1024.0
            self.measure = "ru_maxrss increase (lower bound: 0 when an earlier peak was higher)"


# ---------------------------------------------------------------------------- atomic outputs
def _nearest_existing(path: Path) -> Path:
    path = absolute(path)
    while not path.exists():
        path = path.parent
    return path


class Staging:
    """A hidden temporary folder beside ``dest`` whose files move into ``dest`` on commit.

    Use as a context manager: files are written under :attr:`root` (same relative layout as
    in ``dest``); when the block succeeds they are moved into place, when it raises (or is
    interrupted) the staging folder is deleted and ``dest`` is left as it was. The folder lives
    in ``dest``'s parent (or its nearest existing ancestor, so that nothing is created on
    failure) to keep the final moves on one file system, where renames are atomic.
    """

    def __init__(self, dest: str | os.PathLike) -> None:
        self.dest = absolute(dest)
        if self.dest.exists() and not self.dest.is_dir():
            raise FmregError(f"output folder {self.dest} exists and is not a folder")
        anchor = _nearest_existing(self.dest.parent)
        if not os.access(anchor, os.W_OK):
            raise FmregError(f"cannot write into {anchor}: permission denied")
        self.root = Path(tempfile.mkdtemp(prefix=".fmreg-staging-", dir=anchor))
        self.committed: list[Path] = []

    def path(self, relative: str | os.PathLike) -> Path:
        """Where to write the file that ends up at ``dest / relative``."""
        p = self.root / relative
        p.parent.mkdir(parents=True, exist_ok=True)
        return p

    def files(self) -> list[Path]:
        """Staged files, relative to :attr:`root`."""
        return sorted(p.relative_to(self.root) for p in self.root.rglob("*") if p.is_file())

    def commit(self) -> list[Path]:
        """Move every staged file into ``dest``; returns their final paths."""
        rel = self.files()
        # Temporary files and folders are created private (mkstemp/mkdtemp: 0600/0700); give
        # the results the permissions an ordinary open()/mkdir would have given them.
        umask = os.umask(0)
        os.umask(umask)
        for r in rel:
            os.chmod(self.root / r, 0o666 & ~umask)
        if not self.dest.exists():
            # A fresh destination appears in one rename.
            for d in [self.root, *(p for p in self.root.rglob("*") if p.is_dir())]:
                os.chmod(d, 0o777 & ~umask)
            self.dest.parent.mkdir(parents=True, exist_ok=True)
            os.rename(self.root, self.dest)
        else:
            for r in rel:
                target = self.dest / r
                target.parent.mkdir(parents=True, exist_ok=True)
                if target.is_dir():
                    raise FmregError(f"cannot write {target}: a folder of that name exists")
                os.replace(self.root / r, target)
        self.committed = [self.dest / r for r in rel]
        return self.committed

    def discard(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> "Staging":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc_type is None:
                self.commit()
        finally:
            self.discard()


def check_outputs(
    outputs: Sequence[Path],
    inputs: Sequence[Path | None],
    overwrite: bool,
) -> None:
    """Refuse outputs that would destroy inputs.

    * An output path that *is* an input file is always refused.
    * An existing output file in a folder that holds an input is refused unless ``overwrite``
      (writing results next to the data by mistake must not silently replace files there).

    Raises:
        FmregError: Naming the first offending path.
    """
    ins = [absolute(p) for p in inputs if p is not None]
    in_dirs = {p.parent for p in ins}
    for out in outputs:
        out = absolute(out)
        for i in ins:
            if _is_same_path(out, i):
                raise FmregError(f"output {out} is an input file: choose another output path")
        if out.is_dir():
            raise FmregError(f"cannot write {out}: a folder of that name exists")
        if out.exists() and out.parent in in_dirs and not overwrite:
            raise FmregError(
                f"{out} exists in an input's folder and would be overwritten: choose another "
                "output folder or pass --overwrite"
            )


# ---------------------------------------------------------------------------- labels
def default_label_spec(fixed_labels: Image) -> LabelSpec:
    """Label values to score when the user named none (rule in the module docstring).

    Returns:
        ``LabelSpec(fg=True)`` for a 0..255 mask containing 255, else every non-zero value
        present in ``fixed_labels``.
    """
    # np.unique: torch.unique takes ~0.5 s on a 10×96×96 map on 2 busy cores, numpy < 1 ms.
    values = np.unique(fixed_labels.data.detach().cpu().numpy())
    lo, hi = int(values.min()), int(values.max())
    if lo >= 0 and hi == 255:
        return LabelSpec(fg=True)
    return LabelSpec(values=tuple(int(v) for v in values if int(v) != 0))


def parse_labels(text: str | None) -> LabelSpec | None:
    """``--labels`` text (``"1 2 3"``, ``"1,2,3"`` or ``fg``) to a spec; ``None`` when absent."""
    if text is None:
        return None
    spec = LabelSpec.parse(text.replace(",", " "))
    if spec.empty:
        raise FmregError("--labels is empty: give label values such as '1 2 3', or 'fg'")
    return spec


# ---------------------------------------------------------------------------- loading
@dataclass
class PairData:
    """A validated registration pair read from files.

    Attributes:
        fixed, moving: Intensity images (finite, same dimensionality).
        fixed_labels, moving_labels: Raw label maps on their image's grid, or ``None``.
        fixed_landmarks, moving_landmarks: ``(N, ndim)`` points as in the files, or ``None``.
        paths: Input paths by role (``fixed``, ``moving``, ...), absolute.
    """

    fixed: Image
    moving: Image
    fixed_labels: Image | None = None
    moving_labels: Image | None = None
    fixed_landmarks: Tensor | None = None
    moving_landmarks: Tensor | None = None
    paths: dict[str, Path | None] = field(default_factory=dict)

    @property
    def raster(self) -> bool:
        """True when the fixed image is a 2D picture file: outputs on its grid are PNG."""
        p = self.paths.get("fixed")
        return p is not None and is_2d_raster(p)


def load_pair(
    fixed: str | os.PathLike,
    moving: str | os.PathLike,
    fixed_labels: str | os.PathLike | None = None,
    moving_labels: str | os.PathLike | None = None,
    fixed_landmarks: str | os.PathLike | None = None,
    moving_landmarks: str | os.PathLike | None = None,
    log: Log = stderr_log,
) -> PairData:
    """Read and validate a pair (every check a registration needs before it starts).

    Raises:
        FmregError: Missing/unreadable file, different dimensionality, NaN/Inf intensities, a
            label map off its image's grid, landmarks for one side only or of the wrong
            dimensionality.
    """
    paths = {
        "fixed": absolute(fixed),
        "moving": absolute(moving),
        "fixed_labels": absolute(fixed_labels) if fixed_labels else None,
        "moving_labels": absolute(moving_labels) if moving_labels else None,
        "fixed_landmarks": absolute(fixed_landmarks) if fixed_landmarks else None,
        "moving_landmarks": absolute(moving_landmarks) if moving_landmarks else None,
    }
    if (paths["fixed_landmarks"] is None) != (paths["moving_landmarks"] is None):
        raise FmregError("give both --fixed-landmarks and --moving-landmarks, or neither")
    log(f"reading {paths['fixed'].name} (fixed) and {paths['moving'].name} (moving)")
    fx = read_image(paths["fixed"])
    mv = read_image(paths["moving"])
    check_pair(fx, mv)
    pair = PairData(fx, mv, paths=paths)
    for role, image in (("fixed_labels", fx), ("moving_labels", mv)):
        if paths[role] is not None:
            lab = read_image(paths[role], label=True)
            check_label_grid(lab, image)
            setattr(pair, role, lab)
    if paths["fixed_landmarks"] is not None:
        p, q = read_landmark_pair(paths["fixed_landmarks"], paths["moving_landmarks"])
        if p.shape[1] != fx.ndim:
            raise FmregError(
                f"landmarks are {p.shape[1]}D but the images are {fx.ndim}D: "
                f"{paths['fixed_landmarks']}"
            )
        pair.fixed_landmarks, pair.moving_landmarks = p, q
    return pair


# ---------------------------------------------------------------------------- scoring
def landmark_errors(
    field: DisplacementField,
    fixed_points: Tensor,
    moving_points: Tensor,
    moving_grid: Grid | None = None,
) -> Tensor:
    """Landmark TRE ``|T(p) - q|`` per point pair.

    Points follow the manifest convention: 2D points are pixel indices (x = column, y = row)
    and are placed in the world through their image's grid (the fixed grid for ``p``,
    ``moving_grid`` for ``q``, the unit pixel grid when it is ``None``); 3D points are
    physical mm. Errors are in physical units: mm, or pixels for PNG images (unit spacing).

    Args:
        field: Fixed→moving displacement on the fixed grid.
        fixed_points: ``(N, ndim)`` points ``p`` in the fixed image.
        moving_points: ``(N, ndim)`` partners ``q`` in the moving image.
        moving_grid: The moving image's grid (2D only).

    Returns:
        ``(N,)`` float64 errors.
    """
    grid = field.grid
    p = fixed_points.to(torch.float64)
    q = moving_points.to(torch.float64)
    if grid.ndim == 2:
        p = grid.convert_points(p, Frame.VOXEL, Frame.PHYSICAL)
        q = (moving_grid or Grid(grid.shape)).convert_points(q, Frame.VOXEL, Frame.PHYSICAL)
    # Landmarks off the fixed grid take the nearest border displacement rather than none.
    u = sample(field.to(Frame.PHYSICAL).data, grid, p.T.contiguous(), mode="linear", fill=None)
    mapped = p + u.T.to(torch.float64)
    return metrics.landmark_tre(mapped, q)


def score(
    warped_labels: Image | None,
    fixed_labels: Image | None,
    spec: LabelSpec | None,
    field: DisplacementField | None,
    jacobian: Tensor | None = None,
    landmarks: tuple[Tensor, Tensor] | None = None,
    moving_grid: Grid | None = None,
    log: Log = stderr_log,
) -> dict[str, Any]:
    """All metrics of a registered pair that its ground truth allows.

    Args:
        warped_labels: Moving labels warped onto the fixed grid (raw values), or ``None``.
        fixed_labels: Fixed labels (raw values), or ``None``.
        spec: Which values to score (``fg`` maps are binarized first).
        field: The registration field (for regularity and landmark TRE), or ``None``.
        jacobian: Its Jacobian determinant if already computed.
        landmarks: ``(fixed points, moving points)`` or ``None``.
        moving_grid: Moving image grid, for 2D pixel landmarks.
        log: Where NaN warnings (e.g. a scored label absent from a map) go, one line each.

    Returns:
        ``{"labels", "dice", "hd95", "asd", "centroid_tre", "mean_dice", ...,
        "landmark_tre", "folding_pct", "std_log_jacobian"}`` for what is available. Undefined
        values are NaN (written as ``null`` in JSON).
    """
    out: dict[str, Any] = {}
    with logged_warnings(log):
        if warped_labels is not None and fixed_labels is not None and spec is not None and spec.empty:
            log("warning: the fixed label map has no non-zero label and --labels was not given: no label scores")
        elif warped_labels is not None and fixed_labels is not None and spec is not None:
            values = spec.scored_values()
            scores = metrics.evaluate_labels(
                spec.prepare(warped_labels.data), spec.prepare(fixed_labels.data), fixed_labels.grid, values
            )
            out["labels"] = "fg" if spec.fg else list(values)
            out.update(scores.to_dict())
        if field is not None and landmarks is not None:
            errs = landmark_errors(field, landmarks[0], landmarks[1], moving_grid)
            out["landmark_tre"] = {
                "mean": float(errs.mean()),
                # np.median averages the two middle values; torch.median returns the lower one.
                "median": float(np.median(errs.numpy())),
                "max": float(errs.max()),
                "per_point": errs.tolist(),
                "units": "pixels" if field.grid.ndim == 2 and _unit_grid(field.grid) else "mm",
            }
        if field is not None:
            jac = jacobian_determinant(field) if jacobian is None else jacobian
            out["folding_pct"] = metrics.folding_percent(jac)
            out["std_log_jacobian"] = metrics.std_log_jacobian(jac)
    return out


def _unit_grid(grid: Grid) -> bool:
    return grid.same_as(Grid(grid.shape))


# ---------------------------------------------------------------------------- registration
@dataclass
class Outcome:
    """What one registration produced (before or after writing).

    Attributes:
        result: The method's :class:`RegistrationResult`.
        seconds: Wall time of ``method.register``.
        peak_mem_mb: Peak RSS increase during it (MiB), or ``None``.
        doc: The ``result.json`` content.
        files: Output file names written (relative to the output folder).
    """

    result: RegistrationResult
    seconds: float
    peak_mem_mb: float | None
    doc: dict[str, Any]
    files: list[str] = field(default_factory=list)


def _label_image(image: Image | None, spec: LabelSpec | None) -> Image | None:
    if image is None:
        return None
    if spec is not None and spec.fg:
        return image.with_data(spec.prepare(image.data))
    return image


def output_names(pair: PairData) -> dict[str, str]:
    """File names ``register`` writes for ``pair`` (role → name), besides roi_pairs.png."""
    ext = ".png" if pair.raster else ".nii.gz"
    names = {
        "warped": f"warped{ext}",
        "ddf": "ddf.nii.gz",
        "result": "result.json",
        "overview": "overview.png",
    }
    if pair.moving_labels is not None:
        lab_ext = ext if pair.raster and int(pair.moving_labels.data.max()) <= 255 and int(pair.moving_labels.data.min()) >= 0 else ".nii.gz"
        names["warped_labels"] = f"warped_labels{lab_ext}"
    return names


def register_into(
    method: Method,
    pair: PairData,
    stage: Path,
    spec: LabelSpec | None = None,
    params: dict[str, Any] | None = None,
    log: Log = stderr_log,
) -> Outcome:
    """Register ``pair`` with ``method`` and write every output into the folder ``stage``.

    Label maps reach the method only when ``method.uses_labels`` (upper-bound methods); for
    every other method they serve scoring alone.

    Args:
        method: An instantiated method.
        pair: The validated inputs.
        stage: An existing (staging) folder; files are written directly into it.
        spec: Label values to score; ``None`` picks :func:`default_label_spec`.
        params: The parameters the method was instantiated with (recorded in ``result.json``).
        log: Progress lines.

    Returns:
        The :class:`Outcome`; ``doc`` is what ``result.json`` holds.
    """
    both_labels = pair.fixed_labels is not None and pair.moving_labels is not None
    if both_labels and spec is None:
        spec = default_label_spec(pair.fixed_labels)
    names = output_names(pair)

    method_name = getattr(method, "name", type(method).__name__)
    give_labels = bool(getattr(method, "uses_labels", False))
    if give_labels and not both_labels:
        raise FmregError(f"method '{method_name}' needs the fixed and moving label maps")
    log(f"registering with {method_name} ({pair.fixed.grid.describe()}) …")
    kwargs = {}
    if give_labels:
        kwargs = {
            "fixed_labels": _label_image(pair.fixed_labels, spec),
            "moving_labels": _label_image(pair.moving_labels, spec),
        }
    with PeakMemory() as mem:
        t0 = time.perf_counter()
        result = method.register(pair.fixed, pair.moving, **kwargs)
        seconds = time.perf_counter() - t0
    mem_txt = f", peak memory +{mem.mb:.0f} MiB" if mem.mb is not None else ""
    log(f"registered in {_fmt_seconds(seconds)}{mem_txt}")
    field_ = result.field
    if not field_.grid.same_as(pair.fixed.grid):
        raise RuntimeError(f"method {method_name} returned a field off the fixed grid")  # a bug, not user error

    log("warping and scoring …")
    warped = warp(pair.moving, field_)
    warped_labels = warp_labels(pair.moving_labels, field_) if pair.moving_labels is not None else None
    jac = jacobian_determinant(field_)
    landmarks = (
        (pair.fixed_landmarks, pair.moving_landmarks) if pair.fixed_landmarks is not None else None
    )
    mets = score(
        warped_labels if both_labels else None,
        pair.fixed_labels,
        spec,
        field_,
        jacobian=jac,
        landmarks=landmarks,
        moving_grid=pair.moving.grid,
        log=log,
    )

    log(f"writing outputs …")
    write_image(warped, stage / names["warped"])
    write_field(field_, stage / names["ddf"])
    if warped_labels is not None:
        write_image(warped_labels, stage / names["warped_labels"])
    from fmreg.figures import report  # drawing is needed only here; keeps `import fmreg.app.runner` light

    title = f"{method_name}"
    if "mean_dice" in mets and mets["mean_dice"] is not None and math.isfinite(mets["mean_dice"]):
        title += f"  mean Dice {mets['mean_dice']:.3f}"
    report.save_overview(stage / names["overview"], pair.fixed, pair.moving, warped, field_, jacobian=jac, title=title)
    files = [n for n in names.values()]
    if result.roi_pairs is not None:
        views = [report.RoiPairView(p.fixed_mask, p.moving_mask, p.similarity, i + 1)
                 for i, p in enumerate(result.roi_pairs)]
        report.save_roi_pairs(stage / "roi_pairs.png", pair.fixed, pair.moving, views)
        files.append("roi_pairs.png")

    doc: dict[str, Any] = {
        "fmreg_version": __version__,
        "method": result.method or method_name,
        "parameters": {**(params or {}), **(result.parameters or {})},
        "seconds": seconds,
        "peak_mem_mb": mem.mb,
        "peak_mem_measure": mem.measure,
        "inputs": {k: v for k, v in pair.paths.items() if v is not None},
        "grid": pair.fixed.grid.to_dict(),
        "moving_grid": pair.moving.grid.to_dict(),
        "transform": "fixed->moving: T(x) = x + u(x), u = ddf.nii.gz in physical mm (ITK displacement field)",
        "metrics": mets,
        "outputs": sorted(files),
    }
    # The method's own details (stage timings, ROI pairs, ...) join at the top level; a key that
    # would shadow one of ours stays inside "info" instead.
    info = result.details(pair.fixed.grid, pair.moving.grid)
    clash = {k: v for k, v in info.items() if k in doc}
    doc.update({k: v for k, v in info.items() if k not in doc})
    if clash:
        doc["info"] = clash
    (stage / names["result"]).write_text(dump_json(doc))
    return Outcome(result, seconds, mem.mb, doc, sorted(files))


def register(
    fixed: str | os.PathLike,
    moving: str | os.PathLike,
    outdir: str | os.PathLike,
    method: str = DEFAULT_METHOD,
    params: dict[str, Any] | None = None,
    fixed_labels: str | os.PathLike | None = None,
    moving_labels: str | os.PathLike | None = None,
    labels: str | LabelSpec | None = None,
    fixed_landmarks: str | os.PathLike | None = None,
    moving_landmarks: str | os.PathLike | None = None,
    overwrite: bool = False,
    log: Log = stderr_log,
) -> Outcome:
    """``fmreg register``: register ``moving`` onto ``fixed`` and write every output to ``outdir``.

    Writes ``warped.nii.gz`` (``warped.png`` when the fixed image is a picture), ``ddf.nii.gz``,
    ``warped_labels.*`` (when moving labels are given), ``result.json``, ``overview.png`` and
    roi_pairs.png for a method with ROI pairs; all atomically (nothing is written when anything fails).

    Args:
        fixed, moving: Image files.
        outdir: Output folder (created if missing).
        method: Registered method name.
        params: Keyword parameters for the method.
        fixed_labels, moving_labels: Label maps (scoring; inputs only of label-based methods).
        labels: Label values to score (``"1 2 3"``, ``"fg"`` or a :class:`LabelSpec`); default
            per :func:`default_label_spec`.
        fixed_landmarks, moving_landmarks: Landmark CSVs for landmark TRE.
        overwrite: Allow replacing existing files in an input's folder.
        log: Progress lines.

    Returns:
        The :class:`Outcome` (``doc`` = ``result.json``).
    """
    t_start = time.perf_counter()
    outdir = absolute(outdir)
    spec = parse_labels(labels) if isinstance(labels, str) or labels is None else labels
    if spec is not None and (fixed_labels is None or moving_labels is None):
        raise FmregError("--labels needs both --fixed-labels and --moving-labels")
    # Instantiate first: an unknown method or parameter is reported before any reading.
    meth = make_method(method, params)
    pair = load_pair(fixed, moving, fixed_labels, moving_labels, fixed_landmarks, moving_landmarks, log=log)
    inputs = list(pair.paths.values())
    check_outputs([outdir / n for n in output_names(pair).values()], inputs, overwrite)
    with Staging(outdir) as staging:
        outcome = register_into(meth, pair, staging.root, spec, params, log=log)
        # Artifact names are known only now: check them like the rest before anything moves.
        check_outputs([outdir / n for n in outcome.files], inputs, overwrite)
    log(f"wrote {len(outcome.files)} files to {outdir} in {_fmt_seconds(time.perf_counter() - t_start)}")
    return outcome


# ---------------------------------------------------------------------------- warp / jacobian / evaluate
def warp_file(
    moving: str | os.PathLike,
    ddf: str | os.PathLike,
    reference: str | os.PathLike,
    output: str | os.PathLike,
    labels: bool = False,
    smooth: bool = False,
    overwrite: bool = False,
    log: Log = stderr_log,
) -> Path:
    """``fmreg warp``: resample ``moving`` onto ``reference``'s grid through ``ddf``.

    Args:
        moving: Image (or label map with ``labels``) to warp.
        ddf: Displacement field written by ``fmreg register`` (or any ITK displacement field).
        reference: Image whose grid the field lies on (the fixed image).
        output: Output file (format by extension; PNG for 2D pictures).
        labels: Treat ``moving`` as a label map: nearest neighbour, integer values kept.
        smooth: With ``labels``: the per-label smooth warp of :func:`fmreg.transforms.displacement.warp_labels`.
        overwrite: Allow replacing an existing file in an input's folder.

    Returns:
        The output path.
    """
    output = absolute(output)
    check_outputs([output], [absolute(moving), absolute(ddf), absolute(reference)], overwrite)
    log(f"reading {Path(moving).name}, {Path(ddf).name} and {Path(reference).name}")
    mov = read_image(moving, label=labels)
    if not labels:
        mov.check_finite()
    fld = read_field(ddf)
    ref = read_image(reference)
    if ref.ndim != mov.ndim:
        raise FmregError(f"moving image is {mov.ndim}D but the reference is {ref.ndim}D")
    if not fld.grid.same_as(ref.grid):
        raise FmregError(
            f"the displacement field ({fld.grid.describe()}) is not on the reference grid "
            f"({ref.grid.describe()}): pass the fixed image of the registration as -r"
        )
    # The field's grid is the reference's (checked); use the reference's exact geometry.
    fld = DisplacementField(fld.data, ref.grid, fld.frame)
    log("warping …")
    if smooth and not labels:
        raise FmregError("--smooth applies to label maps: add --labels")
    out = warp_labels(mov, fld, smooth=smooth) if labels else warp(mov, fld)
    with Staging(output.parent) as staging:
        write_image(out, staging.path(output.name))
    log(f"wrote {output}")
    return output


def _jacobian_png_path(output: Path) -> Path:
    name = output.name
    suf = suffix_of(name)
    return output.with_name(name[: len(name) - len(suf)] + ".png")


def jacobian_file(
    ddf: str | os.PathLike,
    output: str | os.PathLike,
    overwrite: bool = False,
    log: Log = stderr_log,
) -> dict[str, Any]:
    """``fmreg jacobian``: Jacobian determinant map of a displacement field.

    A NIfTI (or other volume format) ``output`` gets the determinant values and a PNG picture
    beside it (same name, ``.png``); an ``output`` ending in ``.png`` gets the picture only.

    Returns:
        ``{"outputs": [...], "folding_pct", "std_log_jacobian", "min", "max"}``.
    """
    output = absolute(output)
    suf = suffix_of(output)
    png_only = suf == ".png"
    if not png_only and suf in (".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".npy"):
        raise FmregError(f"{output}: write the Jacobian map as .nii.gz (values) or .png (picture)")
    outs = [output] if png_only else [output, _jacobian_png_path(output)]
    check_outputs(outs, [absolute(ddf)], overwrite)
    log(f"reading {Path(ddf).name}")
    fld = read_field(ddf)
    jac = jacobian_determinant(fld)
    from fmreg.figures import report

    with Staging(output.parent) as staging:
        if not png_only:
            write_image(Image(jac, fld.grid, "jacobian"), staging.path(output.name))
        report.save_jacobian_map(staging.path(outs[-1].name), jac, fld.grid)
    summary = {
        "outputs": [str(p) for p in outs],
        "folding_pct": metrics.folding_percent(jac),
        "std_log_jacobian": metrics.std_log_jacobian(jac),
        "min": float(jac.min()),
        "max": float(jac.max()),
    }
    log(f"wrote {', '.join(str(p) for p in outs)}")
    return summary


def evaluate_files(
    fixed_labels: str | os.PathLike,
    warped_labels: str | os.PathLike,
    labels: str | LabelSpec | None = None,
    ddf: str | os.PathLike | None = None,
    fixed_landmarks: str | os.PathLike | None = None,
    moving_landmarks: str | os.PathLike | None = None,
    moving_image: str | os.PathLike | None = None,
    output: str | os.PathLike | None = None,
    overwrite: bool = False,
    log: Log = stderr_log,
) -> dict[str, Any]:
    """``fmreg evaluate``: metrics of a warped result against the fixed ground truth.

    Args:
        fixed_labels: Fixed label map.
        warped_labels: Moving labels already warped onto the fixed grid.
        labels: Values to score; default per :func:`default_label_spec`.
        ddf: The registration's field: adds folding %, std log|J| and (with landmarks) TRE.
        fixed_landmarks, moving_landmarks: Landmark CSVs (need ``ddf``).
        moving_image: Moving image, only to place 2D pixel landmarks of a moving image whose
            grid is not the unit pixel grid (PNG pictures need nothing).
        output: Optional JSON file for the result.

    Returns:
        The metrics dict (as :func:`score`).
    """
    if (fixed_landmarks is None) != (moving_landmarks is None):
        raise FmregError("give both --fixed-landmarks and --moving-landmarks, or neither")
    if fixed_landmarks is not None and ddf is None:
        raise FmregError("landmark TRE needs the registration's displacement field: pass --ddf")
    inputs = [absolute(p) for p in (fixed_labels, warped_labels, ddf, fixed_landmarks, moving_landmarks, moving_image) if p]
    if output is not None:
        output = absolute(output)
        check_outputs([output], inputs, overwrite)
    spec = parse_labels(labels) if isinstance(labels, str) or labels is None else labels
    log(f"reading {Path(fixed_labels).name} and {Path(warped_labels).name}")
    fl = read_image(fixed_labels, label=True)
    wl = read_image(warped_labels, label=True)
    if not wl.grid.same_as(fl.grid):
        raise FmregError(
            f"warped labels {wl.label()} ({wl.grid.describe()}) are not on the grid of the "
            f"fixed labels ({fl.grid.describe()})"
        )
    if spec is None:
        spec = default_label_spec(fl)
    fld = None
    if ddf is not None:
        fld = read_field(ddf)
        if not fld.grid.same_as(fl.grid):
            raise FmregError(f"the displacement field ({fld.grid.describe()}) is not on the fixed labels' grid ({fl.grid.describe()})")
        fld = DisplacementField(fld.data, fl.grid, fld.frame)
    landmarks = None
    if fixed_landmarks is not None:
        landmarks = read_landmark_pair(fixed_landmarks, moving_landmarks)
        if landmarks[0].shape[1] != fl.ndim:
            raise FmregError(f"landmarks are {landmarks[0].shape[1]}D but the label maps are {fl.ndim}D")
    mgrid = read_image(moving_image).grid if moving_image is not None else None
    mets = score(wl, fl, spec, fld, landmarks=landmarks, moving_grid=mgrid, log=log)
    doc = {"fmreg_version": __version__, "inputs": {"fixed_labels": str(absolute(fixed_labels)), "warped_labels": str(absolute(warped_labels)), **({"ddf": str(absolute(ddf))} if ddf else {})}, "metrics": mets}
    if output is not None:
        with Staging(output.parent) as staging:
            staging.path(output.name).write_text(dump_json(doc))
        log(f"wrote {output}")
    return doc


# ---------------------------------------------------------------------------- demo
def demo(
    outdir: str | os.PathLike = "fmreg-demo",
    method: str = DEFAULT_METHOD,
    params: dict[str, Any] | None = None,
    log: Log = stderr_log,
) -> list[dict[str, Any]]:
    """``fmreg demo``: register the built-in 2D and 3D phantoms and report Dice before/after.

    The phantoms (a known smooth deformation of synthetic anatomy, no patient data) are written
    as NIfTI under ``outdir/data/{2d,3d}`` (NIfTI keeps their geometry), then registered into
    ``outdir/2d`` and ``outdir/3d`` exactly as ``fmreg register`` would.

    Returns:
        One dict per phantom: ``ndim``, ``outdir``, ``overview``, ``pictures``, ``dice_before``,
        ``dice_after``, ``field_error_mm`` (mean endpoint error against the known deformation
        inside the labelled anatomy), ``seconds``.
    """
    from fmreg import phantoms

    outdir = absolute(outdir)
    summaries = []
    meth = make_method(method, params)
    for ndim in (2, 3):
        tag = f"{ndim}d"
        log(f"generating the {ndim}D phantom …")
        ph = phantoms.make_pair(ndim, seed=0)
        data_dir = outdir / "data" / tag
        files = {
            "fixed": "fixed.nii.gz",
            "moving": "moving.nii.gz",
            "fixed_labels": "fixed_labels.nii.gz",
            "moving_labels": "moving_labels.nii.gz",
        }
        with Staging(data_dir) as staging:
            for role, name in files.items():
                write_image(getattr(ph, role), staging.path(name))
            write_field(ph.true_field, staging.path("true_ddf.nii.gz"))
        paths = {role: data_dir / name for role, name in files.items()}
        pair = load_pair(**paths, log=log)
        spec = default_label_spec(pair.fixed_labels)
        with logged_warnings(log):
            before = metrics.evaluate_labels(
                spec.prepare(warp_labels(pair.moving_labels, DisplacementField.identity(pair.fixed.grid)).data),
                spec.prepare(pair.fixed_labels.data),
                pair.fixed.grid,
                spec.scored_values(),
            ).mean_dice
        with Staging(outdir / tag) as staging:
            outcome = register_into(meth, pair, staging.root, spec, params, log=log)
        # Endpoint error against the known deformation, over the labelled anatomy (the
        # background has no texture to register).
        inside = pair.fixed_labels.data != 0
        diff = outcome.result.field.to(Frame.PHYSICAL).data - ph.true_field.to(Frame.PHYSICAL).data
        epe = float(torch.linalg.vector_norm(diff, dim=0)[inside].mean())
        summaries.append(
            {
                "ndim": ndim,
                "field_error_mm": epe,
                "outdir": outdir / tag,
                "overview": outdir / tag / "overview.png",
                "pictures": [outdir / tag / f for f in outcome.files if f.endswith(".png")],
                "dice_before": before,
                "dice_after": outcome.doc["metrics"].get("mean_dice", math.nan),
                "seconds": outcome.seconds,
            }
        )
    return summaries
