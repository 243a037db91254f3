"""``fmreg evaluate``: score a registration result already on disk against the fixed ground truth."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from fmreg import __version__
from fmreg.app.common import Log, stderr_log
from fmreg.core.image import Image
from fmreg.core.grid import check_same_grid
from fmreg.errors import FmregError
from fmreg.evaluate.scoring import default_label_spec, parse_label_spec, score
from fmreg.io.fields import read_field
from fmreg.io.images import read_image
from fmreg.io.manifest import LabelSpec, read_landmark_pair
from fmreg.io.outputs import Staging, check_outputs, dump_json
from fmreg.io.paths import absolute
from fmreg.transforms.displacement import DisplacementField

__all__ = ["evaluate_files"]


def _read_label_maps(fixed_labels: str | os.PathLike, warped_labels: str | os.PathLike, log: Log) -> tuple[Image, Image]:
    """The fixed and the warped label map, checked to lie on one grid."""
    log(f"reading {Path(fixed_labels).name} and {Path(warped_labels).name}")
    fixed_map = read_image(fixed_labels, is_label=True)
    warped_map = read_image(warped_labels, is_label=True)
    check_same_grid(warped_map.grid, fixed_map.grid, f"warped labels {warped_map.label()}",
                    "the grid of the fixed labels")
    return fixed_map, warped_map


def _read_field_on(ddf: str | os.PathLike, fixed_map: Image) -> DisplacementField:
    fld = read_field(ddf)
    check_same_grid(fld.grid, fixed_map.grid, "the displacement field", "the fixed labels' grid")
    # On the fixed grid (checked): take its exact geometry.
    return DisplacementField(fld.data, fixed_map.grid, fld.frame)


def evaluate_files(
    fixed_labels: str | os.PathLike,
    warped_labels: str | os.PathLike,
    label_values: str | LabelSpec | None = None,
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
        fixed_labels: Fixed label map file.
        warped_labels: Moving label map already warped onto the fixed grid.
        label_values: Values to score (``"1 2 3"``, ``"fg"`` or a :class:`LabelSpec`); default
            per :func:`default_label_spec`.
        ddf: The registration's field: adds folding %, std log|J| and (with landmarks) TRE.
        fixed_landmarks, moving_landmarks: Landmark CSVs (need ``ddf``).
        moving_image: Moving image, only to place 2D pixel landmarks of a moving image whose
            grid is not the unit pixel grid (PNG pictures need nothing).
        output: Optional JSON file for the result.
        overwrite: Allow replacing an existing file in an input's folder.
        log: Progress lines.

    Returns:
        ``{"fmreg_version", "inputs", "metrics"}``; ``metrics`` as
        :func:`fmreg.evaluate.scoring.score`.
    """
    if (fixed_landmarks is None) != (moving_landmarks is None):
        raise FmregError("give both --fixed-landmarks and --moving-landmarks, or neither")
    if fixed_landmarks is not None and ddf is None:
        raise FmregError("landmark TRE needs the registration's displacement field: pass --ddf")
    given = (fixed_labels, warped_labels, ddf, fixed_landmarks, moving_landmarks, moving_image)
    inputs = [absolute(p) for p in given if p]
    if output is not None:
        output = absolute(output)
        check_outputs([output], inputs, overwrite)
    label_spec = parse_label_spec(label_values)
    fixed_map, warped_map = _read_label_maps(fixed_labels, warped_labels, log)
    if label_spec is None:
        label_spec = default_label_spec(fixed_map)
    fld = _read_field_on(ddf, fixed_map) if ddf is not None else None
    landmarks = None
    if fixed_landmarks is not None:
        landmarks = read_landmark_pair(fixed_landmarks, moving_landmarks)
        if landmarks[0].shape[1] != fixed_map.ndim:
            raise FmregError(f"landmarks are {landmarks[0].shape[1]}D but the label maps are {fixed_map.ndim}D")
    moving_grid = read_image(moving_image).grid if moving_image is not None else None
    mets = score(warped_map, fixed_map, label_spec, fld, landmarks=landmarks, moving_grid=moving_grid, log=log)
    doc = {
        "fmreg_version": __version__,
        "inputs": {
            "fixed_labels": str(absolute(fixed_labels)),
            "warped_labels": str(absolute(warped_labels)),
            **({"ddf": str(absolute(ddf))} if ddf else {}),
        },
        "metrics": mets,
    }
    if output is not None:
        with Staging(output.parent) as staging:
            staging.path(output.name).write_text(dump_json(doc))
        log(f"wrote {output}")
    return doc
