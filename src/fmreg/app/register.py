"""``fmreg register``: register one pair and write every output (the core of ``bench`` and ``demo``).

Data flows one way: a :class:`~fmreg.io.manifest.Case` is loaded and checked, the method
returns a :class:`~fmreg.methods.base.RegistrationResult` (a field on the fixed grid plus
data about the fit), the app warps and scores with it (:mod:`fmreg.evaluate.scoring`), draws
the pictures (:mod:`fmreg.figures`) and writes everything *atomically*: all files go into a
hidden staging folder inside the destination (:class:`~fmreg.io.outputs.Staging`) and are
moved into place only after every one of them was written, so a failure leaves no partial
output behind.

Measures reported for every registration (``result.json``, ``results.csv``):

* ``seconds``: wall time of ``method.register`` only (reading, warping, scoring and writing
  are excluded, so methods are compared on their own work).
* ``peak_mem_mb``: increase of the process's peak resident set size during
  ``method.register``, in MiB (see :mod:`fmreg.app.profiling`).
* ``warnings``: why the result should not be trusted (:mod:`fmreg.evaluate.trust`), empty
  when nothing is suspect; each is also printed on stderr.
"""

from __future__ import annotations

import math
import os
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import Tensor

from fmreg import __version__
from fmreg.app.common import DEFAULT_METHOD, Log, fmt_seconds, make_method, stderr_log
from fmreg.app.profiling import PeakMemory, release_free_heap
from fmreg.core.image import Image
from fmreg.errors import FmregError, FmregWarning
from fmreg.evaluate.scoring import default_label_spec, parse_label_spec, score
from fmreg.evaluate.trust import trust_warnings
from fmreg.io.fields import write_field
from fmreg.io.images import write_image
from fmreg.io.manifest import Case, LabelSpec
from fmreg.io.outputs import Staging, check_outputs, check_writable, dump_json
from fmreg.io.paths import absolute, is_same_path
from fmreg.methods.base import Method, RegistrationResult
from fmreg.transforms.displacement import DisplacementField, jacobian_determinant
from fmreg.transforms.warp import warp, warp_labels

__all__ = ["KNOWN_OUTPUTS", "Outcome", "earlier_outputs", "output_names", "register", "register_into", "supersede"]

#: How ``result.json`` describes the transform in ``ddf.nii.gz``.
TRANSFORM_NOTE = "fixed->moving: T(x) = x + u(x), u = ddf.nii.gz in physical mm (ITK displacement field)"


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


@dataclass
class _Scored:
    """The registered pair on the fixed grid: warped image and labels, det J, metrics."""

    warped: Image
    warped_labels: Image | None
    jacobian: Tensor  # grid.shape, dimensionless
    metrics: dict[str, Any]


#: Every file name ``register`` may write into its folder, in any run (PNG or NIfTI pair, with
#: or without labels, with or without ROI pairs): what ``--overwrite`` may clean up.
KNOWN_OUTPUTS = (
    "warped.png", "warped.nii.gz", "ddf.nii.gz", "warped_labels.png", "warped_labels.nii.gz",
    "result.json", "overview.png", "roi_pairs.png",
)


def earlier_outputs(folder: Path, inputs: list[Path | None]) -> list[str]:
    """The :data:`KNOWN_OUTPUTS` present in ``folder`` that are no input of this run."""
    ins = [p for p in inputs if p is not None]
    return [n for n in KNOWN_OUTPUTS
            if (folder / n).is_file() and not any(is_same_path(folder / n, i) for i in ins)]


def supersede(staging: Staging, stale: list[str], overwrite: bool, log: Log) -> None:
    """Make ``staging``'s commit delete the ``stale`` outputs of an earlier run (``--overwrite``),
    or say that they stay (the default, which never deletes anything)."""
    if not stale:
        return
    names = ", ".join(stale[:5]) + (f" and {len(stale) - 5} more" if len(stale) > 5 else "")
    if overwrite:
        log(f"--overwrite: removing {len(stale)} earlier output(s) not written this time: {names}")
        staging.remove_at_commit(stale)
    else:
        log(f"note: {staging.dest} keeps earlier outputs not written this time ({names}); "
            "pass --overwrite to remove them")


def output_names(case: Case) -> dict[str, str]:
    """File names ``register`` writes for a loaded ``case`` (role → name), besides roi_pairs.png."""
    ext = ".png" if case.raster else ".nii.gz"
    names = {
        "warped": f"warped{ext}",
        "ddf": "ddf.nii.gz",
        "result": "result.json",
        "overview": "overview.png",
    }
    if case.moving_labels is not None:
        # A picture holds 0..255 only: other label values go to NIfTI even for a PNG pair.
        values = case.moving_labels.data
        fits_png = case.raster and int(values.max()) <= 255 and int(values.min()) >= 0
        names["warped_labels"] = f"warped_labels{ext if fits_png else '.nii.gz'}"
    return names


def _scored_label_map(label_map: Image | None, label_spec: LabelSpec | None) -> Image | None:
    # A label-based method sees the map that is scored: fg masks binarized, others as read.
    if label_map is None:
        return None
    if label_spec is not None and label_spec.fg:
        return label_map.with_data(label_spec.prepare(label_map.data))
    return label_map


def _run_method(
    method: Method, method_name: str, case: Case, label_spec: LabelSpec | None, log: Log
) -> tuple[RegistrationResult, float, PeakMemory]:
    """``method.register`` on the case, timed and with its peak memory measured."""
    give_labels = bool(getattr(method, "uses_labels", False))
    if give_labels and not (case.fixed_labels is not None and case.moving_labels is not None):
        raise FmregError(f"method '{method_name}' needs the fixed and moving label maps")
    log(f"registering with {method_name} ({case.fixed.grid.describe()}) …")
    kwargs = {}
    if give_labels:
        kwargs = {
            "fixed_labels": _scored_label_map(case.fixed_labels, label_spec),
            "moving_labels": _scored_label_map(case.moving_labels, label_spec),
        }
    with PeakMemory() as mem:
        t0 = time.perf_counter()
        result = method.register(case.fixed, case.moving, **kwargs)
        seconds = time.perf_counter() - t0
    mem_txt = f", peak memory +{mem.mb:.0f} MiB" if mem.mb is not None else ""
    log(f"registered in {fmt_seconds(seconds)}{mem_txt}")
    if not result.field.grid.same_as(case.fixed.grid):
        raise RuntimeError(f"method {method_name} returned a field off the fixed grid")  # a bug, not user error
    return result, seconds, mem


def _warp_and_score(case: Case, field_: DisplacementField, label_spec: LabelSpec | None, log: Log) -> _Scored:
    log("warping and scoring …")
    both_labels = case.fixed_labels is not None and case.moving_labels is not None
    warped = warp(case.moving, field_)
    warped_labels = warp_labels(case.moving_labels, field_) if case.moving_labels is not None else None
    jac = jacobian_determinant(field_)
    landmarks = (case.fixed_landmarks, case.moving_landmarks) if case.fixed_landmarks is not None else None
    mets = score(
        warped_labels if both_labels else None,
        case.fixed_labels,
        label_spec,
        field_,
        jacobian=jac,
        landmarks=landmarks,
        moving_grid=case.moving.grid,
        log=log,
    )
    return _Scored(warped, warped_labels, jac, mets)


def _write_outputs(
    stage: Path, names: dict[str, str], case: Case, method_name: str, result: RegistrationResult, scored: _Scored
) -> list[str]:
    """Images, field and pictures into ``stage``; returns the names written."""
    write_image(scored.warped, stage / names["warped"])
    write_field(result.field, stage / names["ddf"])
    if scored.warped_labels is not None:
        write_image(scored.warped_labels, stage / names["warped_labels"])
    # Drawing is needed only here; keeps `import fmreg.app.register` light.
    from fmreg.figures import overview, roi_pairs

    title = f"{method_name}"
    mean_dice = scored.metrics.get("mean_dice")
    if mean_dice is not None and math.isfinite(mean_dice):
        title += f"  mean Dice {mean_dice:.3f}"
    overview.save_overview(
        stage / names["overview"], case.fixed, case.moving, scored.warped, result.field,
        jacobian=scored.jacobian, title=title,
    )
    files = list(names.values())
    if result.roi_pairs is not None:
        fixed, moving = _images_of_pairs(case, result.roi_pairs)
        roi_pairs.save_roi_pairs(stage / "roi_pairs.png", fixed, moving, roi_pair_views(result))
        files.append("roi_pairs.png")
    return files


def _images_of_pairs(case: Case, pairs: list) -> tuple[Image, Image]:
    """The fixed and moving images on the grids of the pairs' masks (resampled when a large image
    was registered on a smaller copy, see :class:`~fmreg.correspond.pairs.RoiPair`)."""
    grids = next((p.grids for p in pairs if p.grids is not None), None)
    if grids is None:
        return case.fixed, case.moving
    from fmreg.core.grid import Frame
    from fmreg.core.sampling import sample

    return tuple(Image(sample(im.data, im.grid, g.coordinates(Frame.PHYSICAL), fill=None), g)
                 for im, g in zip((case.fixed, case.moving), grids))


def roi_pair_views(result: RegistrationResult) -> list:
    """What ``roi_pairs.png`` draws: every matched pair, each marked kept or rejected by the fit.

    The fit's ``kept_pairs`` (indices into ``result.roi_pairs``) is None when the fit used every
    pair (verification off, e.g. ``samreg-labels``), and a list after verification, possibly empty.
    """
    from fmreg.figures.roi_pairs import RoiPairView  # drawing is needed only with ROI pairs

    kept = (result.fit_report or {}).get("kept_pairs")
    return [RoiPairView(p.fixed_mask, p.moving_mask, p.similarity, i + 1, kept is None or i in kept)
            for i, p in enumerate(result.roi_pairs or [])]


def _result_doc(
    case: Case,
    method_name: str,
    params: dict[str, Any] | None,
    result: RegistrationResult,
    seconds: float,
    mem: PeakMemory,
    mets: dict[str, Any],
    files: list[str],
) -> dict[str, Any]:
    """The ``result.json`` document."""
    doc: dict[str, Any] = {
        "fmreg_version": __version__,
        "method": result.method or method_name,
        "parameters": {**(params or {}), **(result.parameters or {})},
        "seconds": seconds,
        "peak_mem_mb": mem.mb,
        "peak_mem_measure": mem.measure,
        "inputs": {k: v for k, v in case.paths.items() if v is not None},
        "grid": case.fixed.grid.to_dict(),
        "moving_grid": case.moving.grid.to_dict(),
        "transform": TRANSFORM_NOTE,
        "metrics": mets,
        "outputs": sorted(files),
    }
    # The method's own details (stage timings, ROI pairs, ...) join at the top level; a key that
    # would shadow one of ours stays inside "info" instead.
    info = result.details(case.fixed.grid, case.moving.grid)
    clash = {k: v for k, v in info.items() if k in doc}
    doc.update({k: v for k, v in info.items() if k not in doc})
    if clash:
        doc["info"] = clash
    return doc


def _untrusted(result: RegistrationResult, method_name: str, case: Case, jacobian: Tensor) -> list[str]:
    """Why the result should not be trusted (:func:`trust_warnings`), each also warned on stderr."""
    found = trust_warnings(result.field, result.method or method_name, result.fit_report, case.moving.grid, jacobian)
    for message in found:
        warnings.warn(message, FmregWarning, stacklevel=2)
    return found


def register_into(
    method: Method,
    case: Case,
    stage: Path,
    label_spec: LabelSpec | None = None,
    params: dict[str, Any] | None = None,
    log: Log = stderr_log,
) -> Outcome:
    """Register a loaded ``case`` with ``method`` and write every output into the folder ``stage``.

    Label maps reach the method only when ``method.uses_labels`` (upper-bound methods); for
    every other method they serve scoring alone.

    Args:
        method: An instantiated method.
        case: The validated inputs (:meth:`Case.load`).
        stage: An existing (staging) folder; files are written directly into it.
        label_spec: Label values to score; ``None`` picks :func:`default_label_spec`.
        params: The parameters the method was instantiated with (recorded in ``result.json``).
        log: Progress lines.

    Returns:
        The :class:`Outcome`; ``doc`` is what ``result.json`` holds.
    """
    if case.fixed_labels is not None and case.moving_labels is not None and label_spec is None:
        label_spec = default_label_spec(case.fixed_labels)
    names = output_names(case)
    method_name = getattr(method, "name", type(method).__name__)
    result, seconds, mem = _run_method(method, method_name, case, label_spec, log)
    release_free_heap()  # each full-size step below would otherwise peak on top of the method's freed pages
    scored = _warp_and_score(case, result.field, label_spec, log)
    release_free_heap()
    log("writing outputs …")
    files = _write_outputs(stage, names, case, method_name, result, scored)
    doc = _result_doc(case, method_name, params, result, seconds, mem, scored.metrics, files)
    doc["warnings"] = _untrusted(result, method_name, case, scored.jacobian)
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
    label_values: str | LabelSpec | None = None,
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
        fixed_labels, moving_labels: Label map files (scoring; inputs only of label-based methods).
        label_values: Label values to score (``"1 2 3"``, ``"fg"`` or a :class:`LabelSpec`);
            default per :func:`default_label_spec`.
        fixed_landmarks, moving_landmarks: Landmark CSVs for landmark TRE.
        overwrite: Allow replacing existing files in an input's folder, and remove fmreg's own
            earlier outputs that this run does not write (e.g. ``warped_labels.png`` of a run
            with labels), so that ``outdir`` holds one consistent result.
        log: Progress lines.

    Returns:
        The :class:`Outcome` (``doc`` = ``result.json``).

    Raises:
        FmregError: Bad input, or an ``outdir`` that cannot be written (checked before any work).
    """
    t_start = time.perf_counter()
    outdir = absolute(outdir)
    check_writable(outdir)  # before any reading or registering
    label_spec = parse_label_spec(label_values)
    if label_spec is not None and (fixed_labels is None or moving_labels is None):
        raise FmregError("--labels needs both --fixed-labels and --moving-labels")
    # Instantiate first: an unknown method or parameter is reported before any reading.
    meth = make_method(method, params)
    case = Case.from_files(fixed, moving, fixed_labels, moving_labels, fixed_landmarks, moving_landmarks,
                           label_spec=label_spec).load(log)
    inputs = list(case.paths.values())
    check_outputs([outdir / n for n in output_names(case).values()], inputs, overwrite)
    with Staging(outdir) as staging:
        outcome = register_into(meth, case, staging.root, case.label_spec, params, log=log)
        # Artifact names are known only now: check them like the rest before anything moves.
        check_outputs([outdir / n for n in outcome.files], inputs, overwrite)
        stale = [n for n in earlier_outputs(outdir, inputs) if n not in outcome.files]
        supersede(staging, stale, overwrite, log)
    log(f"wrote {len(outcome.files)} files to {outdir} in {fmt_seconds(time.perf_counter() - t_start)}")
    return outcome
