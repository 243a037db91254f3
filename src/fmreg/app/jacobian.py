"""``fmreg jacobian``: the Jacobian determinant map of a displacement field, as values and a picture."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from fmreg.app.common import Log, stderr_log
from fmreg.core.image import Image
from fmreg.errors import FmregError
from fmreg.evaluate import metrics
from fmreg.io.fields import read_field
from fmreg.io.images import write_image
from fmreg.io.outputs import Staging, check_outputs, check_writable
from fmreg.io.paths import absolute, suffix_of
from fmreg.transforms.displacement import jacobian_determinant

__all__ = ["jacobian_file"]


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

    A NIfTI (or other volume format) ``output`` gets the determinant values (dimensionless,
    on the field's grid) and a PNG picture beside it (same name, ``.png``); an ``output``
    ending in ``.png`` gets the picture only.

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
    check_writable(output.parent)  # before any reading
    log(f"reading {Path(ddf).name}")
    fld = read_field(ddf)
    jac = jacobian_determinant(fld)
    from fmreg.figures import jacobian as jacobian_figure

    with Staging(output.parent) as staging:
        if not png_only:
            write_image(Image(jac, fld.grid, "jacobian"), staging.path(output.name))
        jacobian_figure.save_jacobian_map(staging.path(outs[-1].name), jac, fld.grid)
    summary = {
        "outputs": [str(p) for p in outs],
        "folding_pct": metrics.folding_percent(jac),
        "std_log_jacobian": metrics.std_log_jacobian(jac),
        "min": float(jac.min()),
        "max": float(jac.max()),
    }
    log(f"wrote {', '.join(str(p) for p in outs)}")
    return summary
