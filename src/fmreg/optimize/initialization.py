"""Global initialisation of a registration from the imaged object's extent (moments).

Inter-subject pairs (two patients' abdomens, two brains) differ by a global scale and shift
that a smooth deformable fit reaches slowly or not at all. ITK's
``CenteredTransformInitializer(MOMENTS)`` and ANTs' centre-of-mass initialisation start from the
intensity moments; here the moments are those of the *object* (the body or the brain, found
as the largest bright connected component), which does not depend on the intensity scale, the
window or the scanner's reconstruction circle.

An object is only trusted when it lies inside the field of view (it barely touches the
border) and fills a good part of it: a cropped cardiac or prostate image has no such object,
and its pair keeps the identity start.
"""

from __future__ import annotations

import logging

import numpy as np
import torch
from torch import Tensor

from fmreg.core.grid import Frame, Grid
from fmreg.core.image import Image
from fmreg.segment.object import object_mask

log = logging.getLogger("fmreg")

#: Scale factors outside [1/x, x] are taken for a failed segmentation, not anatomy.
MAX_SCALE = 2.0


def _moments(mask: Tensor, grid: Grid) -> tuple[np.ndarray, np.ndarray]:
    """Physical centroid ``(ndim,)`` (mm, x first) and covariance ``(ndim, ndim)`` (mm²)."""
    pts = grid.coordinates(Frame.PHYSICAL, dtype=torch.float64).movedim(0, -1).reshape(-1, grid.ndim)
    pts = pts[mask.flatten()].numpy()
    centre = pts.mean(axis=0)
    d = pts - centre
    return centre, d.T @ d / len(d)


def moments_affine(fixed: Image, moving: Image) -> np.ndarray | None:
    """Affine map from the fixed to the moving object by their first and second moments.

    The centroids are matched and each world axis is scaled by the ratio of the objects'
    standard deviations along it (no rotation: scanners image patients in a standard pose,
    and a second-moment rotation is ambiguous for near-symmetric bodies).

    Returns:
        ``(ndim+1, ndim+1)`` homogeneous matrix taking fixed physical points (mm, x first) to
        moving physical points, or None when either image has no object in view or the
        scales are implausible (beyond :data:`MAX_SCALE`).
    """
    fixed_mask = object_mask(fixed)
    moving_mask = object_mask(moving) if fixed_mask is not None else None
    if fixed_mask is None or moving_mask is None:
        return None
    cf, cov_f = _moments(fixed_mask, fixed.grid)
    cm, cov_m = _moments(moving_mask, moving.grid)
    scale = np.sqrt(np.diag(cov_m) / np.maximum(np.diag(cov_f), 1e-9))
    if (scale > MAX_SCALE).any() or (scale < 1 / MAX_SCALE).any():
        log.info("initialisation: object scales %s are implausible; starting from the identity", scale.round(3))
        return None
    n = fixed.ndim
    h = np.eye(n + 1)
    h[:n, :n] = np.diag(scale)
    h[:n, n] = cm - scale * cf
    log.info("initialisation: object moments give scale %s, shift %s mm", scale.round(3), (cm - cf).round(1))
    return h
