"""Registration accuracy metrics: overlap, surface distance, landmark/centroid TRE, regularity.

All functions are plain functions on tensors plus a :class:`~fmreg.core.grid.Grid`:

* Label maps and masks are tensors of shape ``grid.shape`` in **array order** (``(Z, Y, X)``
  or ``(Y, X)``), on any device; they are compared voxel by voxel, so both must already lie on
  the same grid (in registration: the moving labels warped onto the fixed grid vs the fixed
  labels).
* Distances are in the grid's physical units (mm for NIfTI; 1 unit = 1 pixel for the PNG
  slices, whose grids have unit spacing and identity direction).
* Points list their components in ITK order ``(x, y[, z])`` (see :mod:`fmreg.core.grid`).

Undefined scores (a label absent from a map, an empty mask) are returned as NaN and reported
with a :class:`RuntimeWarning` rather than raised, so one bad label does not abort a benchmark;
the ``mean_*`` summaries of :class:`fmreg.evaluate.scoring.LabelScores` skip NaN. Scoring a
whole registered pair (every label, TRE, regularity) is :mod:`fmreg.evaluate.scoring`.

Surface distances follow MONAI's ``compute_hausdorff_distance`` /
``compute_average_surface_distance`` (non-directed / symmetric) conventions, documented on
:func:`hausdorff_distance` and :func:`average_surface_distance`.
"""

from __future__ import annotations

import math
import warnings
from typing import Iterable, Sequence

import numpy as np
import torch
from scipy import ndimage
from torch import Tensor

from fmreg.errors import FmregError
from fmreg.core.grid import Frame, Grid, mask_centroids

__all__ = [
    "average_surface_distance",
    "centroid_tre",
    "dice",
    "folding_percent",
    "hausdorff_distance",
    "hd95",
    "landmark_tre",
    "physical_centroid",
    "score_label_masks",
    "std_log_jacobian",
    "surface_distances",
]

#: Floor applied to Jacobian determinants before the logarithm in :func:`std_log_jacobian`.
LOG_JACOBIAN_EPS = 1e-9


# ---------------------------------------------------------------------------- helpers
def _as_tensor(x, what: str) -> Tensor:
    if isinstance(x, Tensor):
        return x
    try:
        return torch.as_tensor(np.asarray(x))
    except (TypeError, ValueError) as exc:
        raise FmregError(f"{what} is not an array or tensor: {exc}") from exc


def _check_same_shape(a: Tensor, b: Tensor, what_a: str, what_b: str) -> None:
    if tuple(a.shape) != tuple(b.shape):
        raise FmregError(
            f"{what_a} has shape {tuple(a.shape)} but {what_b} has shape {tuple(b.shape)}: "
            "resample both onto the same grid first"
        )


def _check_on_grid(x: Tensor, grid: Grid, what: str) -> None:
    if tuple(x.shape) != tuple(grid.shape):
        raise FmregError(
            f"{what} has shape {tuple(x.shape)} but the grid has shape {grid.shape} (array order)"
        )


def _check_label_values(label_values: Iterable) -> tuple[int, ...]:
    if isinstance(label_values, (str, bytes)):
        raise FmregError(
            f"labels must be a sequence of integer label values, got the string {label_values!r} "
            "(binarize 'fg' masks with fmreg.io.manifest.binarize_fg and score label 1)"
        )
    out = []
    for v in label_values:
        try:
            fv = float(v.item() if isinstance(v, Tensor) else v)
        except (TypeError, ValueError):
            fv = math.nan
        if not fv.is_integer():
            raise FmregError(f"label values must be integers, got {v!r}")
        out.append(int(fv))
    return tuple(out)


def _to_numpy_mask(mask: Tensor) -> np.ndarray:
    return mask.detach().cpu().numpy() != 0


def _warn(message: str) -> None:
    # stacklevel 3: point at the caller of the public metric, not at this helper.
    warnings.warn(message, RuntimeWarning, stacklevel=3)


# ---------------------------------------------------------------------------- overlap
def dice(pred: Tensor, target: Tensor, label_values: Sequence[int]) -> dict[int, float]:
    """Per-label Dice overlap ``2|P ∩ T| / (|P| + |T|)``.

    Args:
        pred: Integer label map, array order, e.g. the moving labels warped onto the fixed grid.
        target: Integer label map of the same shape, e.g. the fixed labels.
        label_values: Label values to score; ``0`` is allowed and scored like any other value.

    Returns:
        ``{label value: Dice in [0, 1]}`` in the order of ``label_values``. A label absent from
        both maps has no defined overlap: its Dice is NaN and a :class:`RuntimeWarning` says
        so. A label present in only one map scores 0.

    Raises:
        FmregError: When the shapes differ or a label value is not an integer.
    """
    pred = _as_tensor(pred, "pred")
    target = _as_tensor(target, "target")
    _check_same_shape(pred, target, "pred", "target")
    out: dict[int, float] = {}
    for value in _check_label_values(label_values):
        p = pred == value
        t = target == value
        denom = int(p.sum()) + int(t.sum())
        if denom == 0:
            _warn(f"label {value} is absent from both label maps: its Dice is NaN")
            out[value] = math.nan
        else:
            out[value] = 2.0 * int((p & t).sum()) / denom
    return out


# ---------------------------------------------------------------------------- surfaces
def _surface(mask: np.ndarray) -> np.ndarray:
    # Surface = mask minus its erosion by the face-connected structuring element (MONAI's
    # get_mask_edges). Outside the array counts as background, so a mask touching the array
    # border has a surface there.
    return mask & ~ndimage.binary_erosion(mask)


def _directed(from_surface: np.ndarray, to_surface: np.ndarray, sampling) -> np.ndarray:
    # EDT of the complement gives every voxel's distance to the nearest `to` surface voxel.
    edt = ndimage.distance_transform_edt(~to_surface, sampling=sampling)
    return np.asarray(edt[from_surface], dtype=np.float64)


def _surface_distances_np(
    pred: np.ndarray, target: np.ndarray, grid: Grid
) -> tuple[np.ndarray, np.ndarray] | None:
    if not pred.any() or not target.any():
        return None
    # Work inside the joint bounding box plus one background voxel per side (clipped at the
    # array border): erosion and distances come out the same, and small structures in large
    # volumes no longer pay for full-volume distance transforms.
    (box,) = ndimage.find_objects((pred | target).astype(np.uint8))
    crop = tuple(
        slice(max(s.start - 1, 0), min(s.stop + 1, n)) for s, n in zip(box, pred.shape)
    )
    pred, target = pred[crop], target[crop]
    ps, ts = _surface(pred), _surface(target)
    sampling = grid.spacing_array
    return _directed(ps, ts, sampling), _directed(ts, ps, sampling)


def _prepare_masks(pred_mask, target_mask, grid: Grid) -> tuple[np.ndarray, np.ndarray]:
    pred_t = _as_tensor(pred_mask, "pred_mask")
    target_t = _as_tensor(target_mask, "target_mask")
    _check_on_grid(pred_t, grid, "pred_mask")
    _check_on_grid(target_t, grid, "target_mask")
    return _to_numpy_mask(pred_t), _to_numpy_mask(target_t)


def surface_distances(
    pred_mask: Tensor, target_mask: Tensor, grid: Grid
) -> tuple[Tensor, Tensor]:
    """Directed distances between the surfaces of two masks, in physical units.

    The surface of a mask is the mask minus its erosion by the face-connected structuring
    element; distances run between surface voxel centres and are measured with the grid's
    spacing per array axis (``grid.spacing_array``), so anisotropic voxels are handled. The
    direction cosines are ignored: they are orthonormal for medical images, and an orthonormal
    direction rotates the grid without changing any distance.

    Args:
        pred_mask: Binary mask (nonzero = inside), shape ``grid.shape`` (array order).
        target_mask: Binary mask, shape ``grid.shape``.
        grid: The grid both masks lie on.

    Returns:
        ``(pred_to_target, target_to_pred)``: 1-D float64 CPU tensors in mm (grid units).
        ``pred_to_target[i]`` is the distance from the i-th surface voxel of ``pred_mask``
        (in C order) to the nearest surface voxel of ``target_mask``, and vice versa. Both are
        empty when either mask is empty (distances to an empty set are undefined).

    Raises:
        FmregError: When a mask's shape differs from ``grid.shape``.
    """
    pred, target = _prepare_masks(pred_mask, target_mask, grid)
    d = _surface_distances_np(pred, target, grid)
    if d is None:
        empty = torch.zeros(0, dtype=torch.float64)
        return empty, empty.clone()
    return torch.from_numpy(d[0]), torch.from_numpy(d[1])


def _distance_metric(pred_mask, target_mask, grid: Grid, reduce, what: str) -> float:
    """``reduce`` of both directed surface-distance sets; NaN (with a warning) if a mask is empty."""
    pred, target = _prepare_masks(pred_mask, target_mask, grid)
    d = _surface_distances_np(pred, target, grid)
    if d is None:
        _warn(f"a mask is empty: its {what} is NaN")
        return math.nan
    return reduce(d)


def _hd_from(d: tuple[np.ndarray, np.ndarray], percentile: float) -> float:
    return float(max(np.percentile(x, percentile) for x in d))


def _asd_from(d: tuple[np.ndarray, np.ndarray]) -> float:
    return float(np.concatenate(d).mean())


def _check_percentile(percentile: float) -> float:
    percentile = float(percentile)
    if not 0.0 <= percentile <= 100.0:
        raise FmregError(f"percentile must be in [0, 100], got {percentile}")
    return percentile


def hausdorff_distance(
    pred_mask: Tensor, target_mask: Tensor, grid: Grid, percentile: float = 100.0
) -> float:
    """Symmetric (percentile) Hausdorff distance between two masks, in physical units.

    MONAI's non-directed convention: the ``percentile``-th percentile of each directed set of
    surface distances (``pred → target`` and ``target → pred``, see
    :func:`surface_distances`) is taken separately, with linear interpolation between order
    statistics (as ``torch.quantile`` / ``numpy.percentile``), and the larger of the two is
    returned. With ``percentile=100`` this is the classic Hausdorff distance.

    Args:
        pred_mask: Binary mask (nonzero = inside), shape ``grid.shape`` (array order).
        target_mask: Binary mask, shape ``grid.shape``.
        grid: The grid both masks lie on.
        percentile: In ``[0, 100]``.

    Returns:
        Distance in mm (grid units); NaN, with a :class:`RuntimeWarning`, when either mask is
        empty.
    """
    percentile = _check_percentile(percentile)
    return _distance_metric(pred_mask, target_mask, grid, lambda d: _hd_from(d, percentile), "Hausdorff distance")


def hd95(pred_mask: Tensor, target_mask: Tensor, grid: Grid) -> float:
    """95th-percentile Hausdorff distance (HD95): :func:`hausdorff_distance` at 95.

    Returns:
        Distance in mm (grid units); NaN, with a :class:`RuntimeWarning`, when either mask is
        empty.
    """
    return _distance_metric(pred_mask, target_mask, grid, lambda d: _hd_from(d, 95.0), "HD95")


def average_surface_distance(pred_mask: Tensor, target_mask: Tensor, grid: Grid) -> float:
    """Symmetric average surface distance (ASD / ASSD), in physical units.

    MONAI's ``symmetric=True`` convention: the mean of both directed distance sets pooled
    together (each surface voxel of either mask counts once), not the mean of the two
    directed means.

    Args:
        pred_mask: Binary mask (nonzero = inside), shape ``grid.shape`` (array order).
        target_mask: Binary mask, shape ``grid.shape``.
        grid: The grid both masks lie on.

    Returns:
        Distance in mm (grid units); NaN, with a :class:`RuntimeWarning`, when either mask is
        empty.
    """
    return _distance_metric(pred_mask, target_mask, grid, _asd_from, "average surface distance")


# ---------------------------------------------------------------------------- TRE
def landmark_tre(
    mapped_fixed: Tensor,
    moving: Tensor,
    grid: Grid | None = None,
    frame: Frame | str = Frame.PHYSICAL,
) -> Tensor:
    """Target registration error of landmark pairs: ``|T(p_i) - q_i|`` per point.

    The registration transform ``T`` maps fixed-image coordinates to moving-image coordinates
    (pull-back), so the caller maps the fixed landmarks ``p_i`` through it and passes the
    result here with their moving partners ``q_i``; how ``T`` is represented stays out of this
    function.

    Landmark files give 2D points in pixel coordinates (x = column, y = row) and 3D points in
    physical mm (x, y, z). Without ``grid`` the distance is taken in the points' own units
    (pixels or mm). With ``grid``, the points are read as positions in ``frame`` of that grid
    and their differences converted to physical mm first (e.g. voxel-index points on an
    anisotropic grid).

    Args:
        mapped_fixed: ``(N, ndim)`` points ``T(p_i)``, components ``(x, y[, z])``.
        moving: ``(N, ndim)`` points ``q_i``, same components and frame.
        grid: Optional grid defining ``frame``; its ``ndim`` must match the points.
        frame: Frame of the points when ``grid`` is given.

    Returns:
        ``(N,)`` float64 tensor of per-point errors (pixels/mm without ``grid``, mm with it).

    Raises:
        FmregError: When the shapes differ, are not ``(N, 2)``/``(N, 3)``, or do not match the
            grid's dimensionality.
    """
    a = _as_tensor(mapped_fixed, "mapped_fixed").to(torch.float64)
    b = _as_tensor(moving, "moving").to(a.device, torch.float64)
    if a.ndim != 2 or a.shape[1] not in (2, 3):
        raise FmregError(f"landmarks must have shape (N, 2) or (N, 3), got {tuple(a.shape)}")
    _check_same_shape(a, b, "the mapped fixed landmarks", "the moving landmarks")
    diff = a - b
    if grid is not None:
        if grid.ndim != a.shape[1]:
            raise FmregError(f"{a.shape[1]}D landmarks cannot be measured on a {grid.ndim}D grid")
        if Frame(frame) is not Frame.PHYSICAL:
            # Frame changes are affine, so a difference of positions converts as a vector.
            diff = grid.convert_vectors(diff, frame, Frame.PHYSICAL)
    return torch.linalg.vector_norm(diff, dim=1)


def physical_centroid(mask: Tensor, grid: Grid) -> np.ndarray | None:
    """World position (mm, components x, y[, z]) of a mask's centroid; None when it is empty.

    (:func:`fmreg.core.grid.mask_centroids` for one mask.)
    """
    centre = mask_centroids(mask[None], grid)[0]
    return None if bool(torch.isnan(centre).any()) else centre.numpy()


def centroid_tre(
    warped_moving_labels: Tensor, fixed_labels: Tensor, grid: Grid, label_values: Sequence[int]
) -> dict[int, float]:
    """Centroid TRE: distance between the physical centroids of each label in two maps.

    This is the "TRE calculated from the centroids of the relevant ROIs" of the SAMReg
    paper, not a landmark TRE: for each label value, the centroid of its voxels in the
    warped moving map and in the fixed map is placed in world coordinates with
    ``grid.index_to_world_matrix()`` and the Euclidean distance between the two is returned.

    Args:
        warped_moving_labels: Integer label map on ``grid`` (array order), the moving labels
            warped onto the fixed grid.
        fixed_labels: Integer label map on ``grid``.
        grid: The fixed grid.
        label_values: Label values to score (``0`` allowed).

    Returns:
        ``{label value: distance in mm (grid units)}``; NaN, with a :class:`RuntimeWarning`,
        for a label absent from either map.
    """
    warped = _as_tensor(warped_moving_labels, "warped_moving_labels")
    fixed = _as_tensor(fixed_labels, "fixed_labels")
    _check_on_grid(warped, grid, "warped_moving_labels")
    _check_on_grid(fixed, grid, "fixed_labels")
    out: dict[int, float] = {}
    for value in _check_label_values(label_values):
        out[value] = _centroid_distance(warped == value, fixed == value, grid)
        if math.isnan(out[value]):
            _warn(f"label {value} is absent from a label map: its centroid TRE is NaN")
    return out


def _centroid_distance(a: Tensor, b: Tensor, grid: Grid) -> float:
    ca, cb = physical_centroid(a, grid), physical_centroid(b, grid)
    if ca is None or cb is None:
        return math.nan
    return float(np.linalg.norm(ca - cb))


def score_label_masks(pred_mask: Tensor, target_mask: Tensor, grid: Grid) -> tuple[float, float, float, float]:
    """Dice, HD95, ASD and centroid TRE of one label from its two masks, in one pass.

    The surface distances are computed once and shared by HD95 and ASD (what
    :func:`fmreg.evaluate.scoring.evaluate_labels` needs for every label of a pair).

    Args:
        pred_mask: Boolean mask on ``grid`` (array order), e.g. a label of the warped moving map.
        target_mask: Boolean mask on ``grid``, the same label of the fixed map.
        grid: The fixed grid.

    Returns:
        ``(dice, hd95, asd, centroid_tre)``; distances in mm (grid units). Undefined scores
        are NaN, without a warning: the caller knows which label to name.
    """
    n_p, n_t = int(pred_mask.sum()), int(target_mask.sum())
    dsc = 2.0 * int((pred_mask & target_mask).sum()) / (n_p + n_t) if n_p + n_t else math.nan
    d = _surface_distances_np(_to_numpy_mask(pred_mask), _to_numpy_mask(target_mask), grid)
    hd = _hd_from(d, 95.0) if d is not None else math.nan
    asd = _asd_from(d) if d is not None else math.nan
    return dsc, hd, asd, _centroid_distance(pred_mask, target_mask, grid)


# ---------------------------------------------------------------------------- regularity
def folding_percent(jac_det: Tensor) -> float:
    """Percentage of voxels whose Jacobian determinant is ``<= 0`` (folded or collapsed).

    Args:
        jac_det: Jacobian determinants of the transform, any shape (typically ``grid.shape``),
            dimensionless.

    Returns:
        Percentage in ``[0, 100]``.

    Raises:
        FmregError: When ``jac_det`` is empty.
    """
    jac_det = _as_tensor(jac_det, "jac_det")
    if jac_det.numel() == 0:
        raise FmregError("cannot compute the folding percentage of an empty Jacobian map")
    return 100.0 * int((jac_det <= 0).sum()) / jac_det.numel()


def std_log_jacobian(jac_det: Tensor, eps: float = LOG_JACOBIAN_EPS) -> float:
    """Standard deviation of ``log(det J)`` (SDlogJ), a smoothness measure of the transform.

    Determinants are clamped below at ``eps`` (default ``1e-9``) before the logarithm, so
    folded voxels (``det <= 0``) contribute ``log(eps) ≈ -20.7`` instead of NaN/-inf, as in the
    Learn2Reg evaluation. The population standard deviation (``ddof = 0``) is returned.

    Args:
        jac_det: Jacobian determinants, any shape, dimensionless.
        eps: Positive floor for the determinants.

    Returns:
        SDlogJ (dimensionless, ``>= 0``).

    Raises:
        FmregError: When ``jac_det`` is empty or ``eps`` is not positive.
    """
    jac_det = _as_tensor(jac_det, "jac_det")
    if jac_det.numel() == 0:
        raise FmregError("cannot compute the std of log-Jacobian of an empty Jacobian map")
    if not eps > 0:
        raise FmregError(f"eps must be positive, got {eps}")
    log_j = torch.log(jac_det.to(torch.float64).clamp_min(eps))
    return float(log_j.std(correction=0))
