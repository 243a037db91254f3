"""Scoring a registered pair: every metric its ground truth allows, and which labels count.

:func:`score` is what ``fmreg register``, ``evaluate``, ``bench`` and ``demo`` report under
``"metrics"`` in ``result.json``: per-label Dice, HD95, ASD and centroid TRE
(:func:`evaluate_labels` → :class:`LabelScores`), landmark TRE (:func:`landmark_errors`) and
the regularity of the field (folding %, std log|J|). The single metrics are in
:mod:`fmreg.evaluate.metrics`.

Label values scored when none are given (``--labels`` absent, see :func:`default_label_spec`):
a fixed label map whose values all lie in 0..255 and include 255 is a rendered binary mask
(the PNG masks of the shared data are 0/255, some anti-aliased): it is scored as ``fg``, i.e.
foreground = value > 127, reported as label 1. Any other map scores every non-zero value present
in the fixed label map.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np
import torch
from torch import Tensor

from fmreg.core.grid import Frame, Grid
from fmreg.core.image import Image
from fmreg.errors import FmregError
from fmreg.evaluate import metrics
from fmreg.evaluate.metrics import _as_tensor, _check_label_values, _check_on_grid, _warn
from fmreg.io.manifest import LabelSpec
from fmreg.transforms.displacement import DisplacementField, jacobian_determinant

__all__ = [
    "LabelScores",
    "default_label_spec",
    "evaluate_labels",
    "landmark_errors",
    "logged_warnings",
    "parse_label_spec",
    "score",
]

#: Where progress and warning lines go (one line per call, no trailing newline).
Log = Callable[[str], None]


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


# ---------------------------------------------------------------------------- label scores
def _nanmean(values: Iterable[float]) -> float:
    finite = [v for v in values if not math.isnan(v)]
    return float(sum(finite) / len(finite)) if finite else math.nan


@dataclass(frozen=True)
class LabelScores:
    """Per-label scores of one registered pair (all keyed by label value).

    Attributes:
        dice: Dice overlap in ``[0, 1]``.
        hd95: 95th-percentile symmetric Hausdorff distance, mm (grid units).
        asd: Symmetric average surface distance, mm (grid units).
        centroid_tre: Distance between label centroids, mm (grid units).
    """

    dice: dict[int, float] = field(default_factory=dict)
    hd95: dict[int, float] = field(default_factory=dict)
    asd: dict[int, float] = field(default_factory=dict)
    centroid_tre: dict[int, float] = field(default_factory=dict)

    @property
    def label_values(self) -> tuple[int, ...]:
        """The scored label values, in scoring order."""
        return tuple(self.dice)

    @property
    def mean_dice(self) -> float:
        """Mean over labels, ignoring NaN; NaN when every label is NaN."""
        return _nanmean(self.dice.values())

    @property
    def mean_hd95(self) -> float:
        """Mean over labels, ignoring NaN; NaN when every label is NaN."""
        return _nanmean(self.hd95.values())

    @property
    def mean_asd(self) -> float:
        """Mean over labels, ignoring NaN; NaN when every label is NaN."""
        return _nanmean(self.asd.values())

    @property
    def mean_centroid_tre(self) -> float:
        """Mean over labels, ignoring NaN; NaN when every label is NaN."""
        return _nanmean(self.centroid_tre.values())

    def to_dict(self) -> dict:
        """Plain nested dict (label keys as strings) for JSON reports."""
        per_label = {
            name: {str(k): v for k, v in getattr(self, name).items()}
            for name in ("dice", "hd95", "asd", "centroid_tre")
        }
        means = {
            "mean_dice": self.mean_dice,
            "mean_hd95": self.mean_hd95,
            "mean_asd": self.mean_asd,
            "mean_centroid_tre": self.mean_centroid_tre,
        }
        return {**per_label, **means}


def evaluate_labels(
    warped_moving_labels: Tensor, fixed_labels: Tensor, grid: Grid, label_values: Sequence[int]
) -> LabelScores:
    """Dice, HD95, ASD and centroid TRE of every label value (see :mod:`fmreg.evaluate.metrics`).

    For ``fg`` pairs, pass maps binarized with :func:`~fmreg.io.manifest.binarize_fg` and
    ``label_values=(1,)``.

    Args:
        warped_moving_labels: Integer label map on ``grid`` (array order), the moving labels
            warped onto the fixed grid.
        fixed_labels: Integer label map on ``grid``.
        grid: The fixed grid.
        label_values: Label values to score (``0`` allowed).

    Returns:
        :class:`LabelScores`. A label absent from one or both maps gets NaN where its score is
        undefined (Dice only when absent from both, where a missing label in one map scores
        0), with one :class:`RuntimeWarning` per such label.
    """
    warped = _as_tensor(warped_moving_labels, "warped_moving_labels")
    fixed = _as_tensor(fixed_labels, "fixed_labels")
    _check_on_grid(warped, grid, "warped_moving_labels")
    _check_on_grid(fixed, grid, "fixed_labels")
    dsc, hd, asd, tre = {}, {}, {}, {}
    for value in _check_label_values(label_values):
        p = warped == value
        t = fixed == value
        dsc[value], hd[value], asd[value], tre[value] = metrics.score_label_masks(p, t, grid)
        missing = [name for name, m in (("warped moving", p), ("fixed", t)) if not bool(m.any())]
        if missing:
            _warn(
                f"label {value} is absent from the {' and '.join(missing)} labels: "
                "its undefined scores are NaN"
            )
    return LabelScores(dice=dsc, hd95=hd, asd=asd, centroid_tre=tre)


# ---------------------------------------------------------------------------- label policy
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


def parse_label_spec(label_values: str | LabelSpec | None) -> LabelSpec | None:
    """``--labels`` text (``"1 2 3"``, ``"1,2,3"`` or ``fg``) to a spec; ``None`` when absent.

    A :class:`LabelSpec` passes through unchanged.

    Raises:
        FmregError: When the text names no value or is neither ``fg`` nor integers.
    """
    if label_values is None or isinstance(label_values, LabelSpec):
        return label_values
    spec = LabelSpec.parse(label_values.replace(",", " "))
    if spec.empty:
        raise FmregError("--labels is empty: give label values such as '1 2 3', or 'fg'")
    return spec


# ---------------------------------------------------------------------------- a registered pair
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
        fixed_points: ``(N, ndim)`` points ``p`` in the fixed image, components ``(x, y[, z])``.
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
    return metrics.landmark_tre(field.map_points(p), q)


def _landmark_summary(errors: Tensor, grid: Grid) -> dict[str, Any]:
    return {
        "mean": float(errors.mean()),
        # np.median averages the two middle values; torch.median returns the lower one.
        "median": float(np.median(errors.numpy())),
        "max": float(errors.max()),
        "per_point": errors.tolist(),
        "units": "pixels" if grid.ndim == 2 and grid.same_as(Grid(grid.shape)) else "mm",
    }


def score(
    warped_labels: Image | None,
    fixed_labels: Image | None,
    label_spec: LabelSpec | None,
    field: DisplacementField | None,
    jacobian: Tensor | None = None,
    landmarks: tuple[Tensor, Tensor] | None = None,
    moving_grid: Grid | None = None,
    *,
    log: Log,
) -> dict[str, Any]:
    """All metrics of a registered pair that its ground truth allows.

    Args:
        warped_labels: Moving label map warped onto the fixed grid (raw values), or ``None``.
        fixed_labels: Fixed label map (raw values), or ``None``.
        label_spec: Which values to score (``fg`` maps are binarized first).
        field: The registration field (for regularity and landmark TRE), or ``None``.
        jacobian: Its Jacobian determinant (``grid.shape``) if already computed.
        landmarks: ``(fixed points, moving points)``, each ``(N, ndim)``, or ``None``.
        moving_grid: Moving image grid, for 2D pixel landmarks.
        log: Where NaN warnings (e.g. a scored label absent from a map) go, one line each.

    Returns:
        ``{"labels", "dice", "hd95", "asd", "centroid_tre", "mean_dice", ...,
        "landmark_tre", "folding_pct", "std_log_jacobian"}`` for what is available. Undefined
        values are NaN (written as ``null`` in JSON).
    """
    out: dict[str, Any] = {}
    with logged_warnings(log):
        have_labels = warped_labels is not None and fixed_labels is not None and label_spec is not None
        if have_labels and label_spec.empty:
            log("warning: the fixed label map has no non-zero label and --labels was not given: no label scores")
        elif have_labels:
            values = label_spec.scored_values()
            scores = evaluate_labels(
                label_spec.prepare(warped_labels.data), label_spec.prepare(fixed_labels.data), fixed_labels.grid, values
            )
            out["labels"] = "fg" if label_spec.fg else list(values)
            out.update(scores.to_dict())
        if field is not None and landmarks is not None:
            errors = landmark_errors(field, landmarks[0], landmarks[1], moving_grid)
            out["landmark_tre"] = _landmark_summary(errors, field.grid)
        if field is not None:
            jac = jacobian_determinant(field) if jacobian is None else jacobian
            out["folding_pct"] = metrics.folding_percent(jac)
            out["std_log_jacobian"] = metrics.std_log_jacobian(jac)
    return out
