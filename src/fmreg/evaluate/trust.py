"""Whether a registration result can be trusted: warnings computed from the field and the fit report.

A registration always returns a field; these checks say when that field should not be believed,
for every method alike (they read only the field, its Jacobian and the optional fit report):

* the method returned the identity although it is not the identity method (nothing drove it);
* the image term of the fit did not decrease (the images never agreed better than at the start);
* the field folds more than :data:`MAX_FOLDING_PCT` % of the fixed image;
* displacements reach :data:`MAX_SHIFT_FRACTION` of the field of view;
* the transform maps more than :data:`MAX_OUTSIDE_FRACTION` of the fixed image outside the moving one.

The thresholds lie well beyond what the example pairs give (samreg and samreg-labels on the 12
pairs of ``pairs.csv``: folding at most 0.36 %, displacements at most 25 % of the field of view).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from fmreg.core.grid import Frame, Grid
from fmreg.transforms.displacement import DisplacementField, jacobian_determinant

__all__ = ["MAX_FOLDING_PCT", "MAX_OUTSIDE_FRACTION", "MAX_SHIFT_FRACTION", "MIN_IMAGE_GAIN", "trust_warnings"]

#: Folding (det J <= 0) above this percentage of the fixed voxels: the field is not a plausible anatomy map.
MAX_FOLDING_PCT = 1.0
#: Displacements of at least this fraction of the field of view (its largest extent) are implausible.
MAX_SHIFT_FRACTION = 0.5
#: More than this fraction of the fixed voxels mapped outside the moving image: the overlap is lost.
MAX_OUTSIDE_FRACTION = 0.5
#: A fit whose image term fell by less than this fraction of its start did not improve the match.
MIN_IMAGE_GAIN = 0.01
#: Image terms below this at the start are images that agree already: no gain is expected.
_AGREEING_TERM = 1e-6
#: Voxels per slab of :func:`_outside_fraction`.
SLAB_VOXELS = 1 << 20


def _fit_warnings(fit_report: dict[str, Any] | None) -> list[str]:
    """The image term of the fit (see :class:`fmreg.optimize.fit.FitReport` ``image_term``)."""
    term = (fit_report or {}).get("image_term")
    if not term:
        return []
    start, end = float(term["start"]), float(term["end"])
    if start > _AGREEING_TERM and end > start * (1.0 - MIN_IMAGE_GAIN):
        return [
            f"the image term never decreased during the fit ({term['metric']} {start:.4g} at the start, "
            f"{end:.4g} at the end): the images did not drive the registration"
        ]
    return []


def _outside_fraction(field: DisplacementField, moving_grid: Grid) -> float:
    """Fraction of the fixed voxels whose mapped point lies outside the moving image (beyond half a voxel)."""
    points = field.mapped_points(Frame.PHYSICAL)
    # VOXEL components are x, y[, z]: reverse the array-order shape to match them.
    upper = torch.tensor(moving_grid.shape[::-1], dtype=torch.float64) - 0.5
    rows = max(1, SLAB_VOXELS // max(1, points[0].numel() // points.shape[1]))
    inside = 0
    # In slabs of rows: float64 indices of a whole 3000² field would take 0.3 GB at once.
    for a in range(0, points.shape[1], rows):
        slab = points[:, a : a + rows].movedim(0, -1).double()
        index = moving_grid.convert_points(slab, Frame.PHYSICAL, Frame.VOXEL)
        inside += int(((index >= -0.5) & (index <= upper)).all(dim=-1).sum())
    return 1.0 - inside / points[0].numel()


def _field_warnings(field: DisplacementField, jacobian: Tensor, moving_grid: Grid | None) -> list[str]:
    """Folding, displacement size and overlap of the mapped fixed image with the moving one."""
    out = []
    folding = 100.0 * float((jacobian <= 0).double().mean())
    if folding > MAX_FOLDING_PCT:
        out.append(f"the field folds {folding:.2f} % of the fixed image (det J <= 0; above {MAX_FOLDING_PCT:g} %)")
    grid = field.grid
    fov = max(n * s for n, s in zip(grid.shape, grid.spacing_array))
    largest = float(field.to(Frame.PHYSICAL).data.norm(dim=0).max())
    if largest >= MAX_SHIFT_FRACTION * fov:
        out.append(f"displacements reach {largest:.1f} mm, {100 * largest / fov:.0f} % of the field of view "
                   f"({fov:.0f} mm)")
    if moving_grid is not None:
        outside = _outside_fraction(field, moving_grid)
        if outside > MAX_OUTSIDE_FRACTION:
            out.append(f"the transform maps {100 * outside:.0f} % of the fixed image outside the moving image")
    return out


def trust_warnings(
    field: DisplacementField,
    method: str,
    fit_report: dict[str, Any] | None = None,
    moving_grid: Grid | None = None,
    jacobian: Tensor | None = None,
) -> list[str]:
    """Reasons not to trust a registration result, one sentence each (empty when none).

    Args:
        field: The fixed→moving displacement (any frame) on the fixed grid.
        method: The method's name; the ``identity`` method is expected to return a zero field.
        fit_report: The fit's report (``RegistrationResult.fit_report``), or None.
        moving_grid: Grid of the moving image (for the overlap check), or None to skip it.
        jacobian: ``det J`` of ``field`` if already computed.

    Returns:
        Warning sentences, in the order of the module docstring.
    """
    if method != "identity" and not bool(field.data.any()):
        return [f"{method} returned the identity (a zero field): nothing drove the registration"]
    jac = jacobian_determinant(field) if jacobian is None else jacobian
    return _fit_warnings(fit_report) + _field_warnings(field, jac, moving_grid)
