"""``fmreg warp``: apply a displacement field written by ``register`` to an image or label map."""

from __future__ import annotations

import os
from pathlib import Path

from fmreg.app.common import Log, stderr_log
from fmreg.core.grid import check_same_grid
from fmreg.errors import FmregError
from fmreg.io.fields import read_field
from fmreg.io.images import read_image, write_image
from fmreg.io.outputs import Staging, check_outputs, check_writable
from fmreg.io.paths import absolute
from fmreg.transforms.displacement import DisplacementField
from fmreg.transforms.warp import warp, warp_labels

__all__ = ["warp_file"]


def warp_file(
    moving: str | os.PathLike,
    ddf: str | os.PathLike,
    reference: str | os.PathLike,
    output: str | os.PathLike,
    is_label: bool = False,
    smooth: bool = False,
    overwrite: bool = False,
    log: Log = stderr_log,
) -> Path:
    """``fmreg warp``: resample ``moving`` onto ``reference``'s grid through ``ddf``.

    Args:
        moving: Image (or label map with ``is_label``) to warp.
        ddf: Displacement field written by ``fmreg register`` (or any ITK displacement field).
        reference: Image whose grid the field lies on (the fixed image).
        output: Output file (format by extension; PNG for 2D pictures).
        is_label: Treat ``moving`` as a label map: nearest neighbour, integer values kept.
        smooth: With ``is_label``: the per-label smooth warp of
            :func:`fmreg.transforms.displacement.warp_labels`.
        overwrite: Allow replacing an existing file in an input's folder.
        log: Progress lines.

    Returns:
        The output path.
    """
    output = absolute(output)
    check_outputs([output], [absolute(moving), absolute(ddf), absolute(reference)], overwrite)
    check_writable(output.parent)  # before any reading
    log(f"reading {Path(moving).name}, {Path(ddf).name} and {Path(reference).name}")
    mov = read_image(moving, is_label=is_label)
    if not is_label:
        mov.check_finite()
    fld = read_field(ddf)
    ref = read_image(reference)
    if ref.ndim != mov.ndim:
        raise FmregError(f"moving image is {mov.ndim}D but the reference is {ref.ndim}D")
    check_same_grid(fld.grid, ref.grid, "the displacement field", "the reference grid",
                    "pass the fixed image of the registration as -r")
    # The field's grid is the reference's (checked); use the reference's exact geometry.
    fld = DisplacementField(fld.data, ref.grid, fld.frame)
    log("warping …")
    if smooth and not is_label:
        raise FmregError("--smooth applies to label maps: add --labels")
    out = warp_labels(mov, fld, smooth=smooth) if is_label else warp(mov, fld)
    with Staging(output.parent) as staging:
        write_image(out, staging.path(output.name))
    log(f"wrote {output}")
    return output
