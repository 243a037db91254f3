"""``fmreg demo``: register the built-in 2D and 3D phantoms and report Dice before and after."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import torch

from fmreg.app.common import DEFAULT_METHOD, Log, make_method, stderr_log
from fmreg.app.register import earlier_outputs, register_into
from fmreg.core.grid import Frame
from fmreg.evaluate.scoring import default_label_spec, evaluate_labels, logged_warnings
from fmreg.io.fields import write_field
from fmreg.io.images import write_image
from fmreg.io.manifest import Case, LabelSpec
from fmreg.io.outputs import Staging, check_writable
from fmreg.io.paths import absolute
from fmreg.transforms.displacement import DisplacementField
from fmreg.transforms.warp import warp_labels

__all__ = ["demo"]

#: The phantom's files under ``outdir/data/{2d,3d}`` (NIfTI keeps their geometry).
PHANTOM_FILES = {
    "fixed": "fixed.nii.gz",
    "moving": "moving.nii.gz",
    "fixed_labels": "fixed_labels.nii.gz",
    "moving_labels": "moving_labels.nii.gz",
}


def _write_phantom(phantom, data_dir: Path) -> Case:
    """Write a phantom pair and its true field into ``data_dir``; the case of its files."""
    with Staging(data_dir) as staging:
        for role, name in PHANTOM_FILES.items():
            write_image(getattr(phantom, role), staging.path(name))
        write_field(phantom.true_field, staging.path("true_ddf.nii.gz"))
    return Case.from_files(**{role: data_dir / name for role, name in PHANTOM_FILES.items()})


def _dice_before(case: Case, spec: LabelSpec, log: Log) -> float:
    """Mean Dice of the unregistered pair (moving labels through the identity)."""
    with logged_warnings(log):
        return evaluate_labels(
            spec.prepare(warp_labels(case.moving_labels, DisplacementField.identity(case.fixed.grid)).data),
            spec.prepare(case.fixed_labels.data),
            case.fixed.grid,
            spec.scored_values(),
        ).mean_dice


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
    check_writable(outdir)  # before generating anything
    summaries = []
    meth = make_method(method, params)
    for ndim in (2, 3):
        tag = f"{ndim}d"
        log(f"generating the {ndim}D phantom …")
        ph = phantoms.make_pair(ndim, seed=0)
        case = _write_phantom(ph, outdir / "data" / tag).load(log)
        spec = default_label_spec(case.fixed_labels)
        before = _dice_before(case, spec, log)
        with Staging(outdir / tag) as staging:
            outcome = register_into(meth, case, staging.root, spec, params, log=log)
            # The demo's folders are its own: a rerun (e.g. with another method) leaves no
            # earlier picture that this result.json does not list.
            staging.remove_at_commit([n for n in earlier_outputs(outdir / tag, []) if n not in outcome.files])
        # Endpoint error against the known deformation, over the labelled anatomy (the
        # background has no texture to register).
        inside = case.fixed_labels.data != 0
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
