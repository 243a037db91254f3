"""Contour-aware loss of mask-guided registration (paper 001, Xu et al., IPMI 2025).

A symmetric Chamfer distance between the contours of the warped moving masks and of the fixed
masks, squared-distance form, in physical units (mm²). For one ROI with warped-moving contour
``C_w`` and fixed contour ``C_f``::

    L = 1/|C_w| Σ_{p ∈ C_w} min_{q ∈ C_f} ‖p − q‖²  +  1/|C_f| Σ_{q ∈ C_f} min_{p ∈ C_w} ‖q − p‖²
        (forward: warped → fixed)                    (backward: fixed → warped)

``min_q ‖p − q‖`` is a Euclidean distance transform of the contour (``scipy.ndimage.
distance_transform_edt`` with ``sampling=`` the spacing), computed without gradient; the
gradient with respect to the transform comes from where it is *sampled*:

* forward: the fixed contour's distance map is averaged with the weights of the **soft contour
  of the soft warped mask**; moving that weight towards small distances is the gradient.
* backward: the warped mask's own distance map does not depend differentiably on the warp. When
  the moving masks and the transform's points ``T(x)`` are given, the backward term samples the
  **moving** contour's distance map (on the moving grid, constant) at ``T(q)`` for the fixed
  contour points ``q``, which is differentiable through ``grid_sample``; it measures the
  distance in the moving image, equal to the warped one where ``T`` is locally a translation or
  rotation. Without them, it is computed from the binarised warped mask and carries no gradient.

The *contour* of a mask ``m`` is ``m − erode(m)``, the erosion being the minimum over the face
neighbours (4 in 2D, 6 in 3D) by max-pooling, voxels outside the field of view ignored (the
image edge is not an anatomical boundary). For a binary mask it is the set of inside voxels with
an outside face neighbour; for a soft mask a soft band of the same width, with values in [0, 1].

Tensors are batch-first, array order: masks ``(B, K, *shape)`` in ``[0, 1]``; ``spacing`` is mm
per array axis of the (common) working grid.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from scipy.ndimage import distance_transform_edt
from torch import Tensor, nn

from fmreg.core.sampling import sample_normalized
from fmreg.losses.base import LossRecord


def soft_contour(masks: Tensor) -> Tensor:
    """``m − erode(m)`` with a face-neighbour (cross-shaped) erosion by max-pooling.

    Args:
        masks: ``(B, K, *shape)`` soft masks in ``[0, 1]``, 2D or 3D.

    Returns:
        ``(B, K, *shape)`` contour weights in ``[0, 1]`` (differentiable in ``masks``).
    """
    ndim = masks.dim() - 2
    pool = F.max_pool2d if ndim == 2 else F.max_pool3d
    eroded = masks
    for axis in range(ndim):
        kernel, pad = [1] * ndim, [0] * ndim
        kernel[axis], pad[axis] = 3, 1
        # max_pool pads with -inf, so outside the field of view never erodes the mask.
        eroded = torch.minimum(eroded, -pool(-masks, kernel, stride=1, padding=pad))
    return masks - eroded


def contour_distance(masks: Tensor, spacing: Sequence[float]) -> tuple[Tensor, Tensor]:
    """Distance (mm) from every voxel to the nearest contour voxel of each binarised mask.

    Args:
        masks: ``(B, K, *shape)`` masks, binarised at 0.5 (no gradient).
        spacing: mm per array axis.

    Returns:
        ``(distance, valid)``: ``(B, K, *shape)`` float distances in mm (zeros where invalid) and
        ``(B, K)`` bool, False where the mask has no contour (empty, or the whole image).
    """
    with torch.no_grad():
        contour = soft_contour((masks.detach() > 0.5).float()) > 0.5
        c = contour.cpu().numpy()
    dist = np.zeros(c.shape, dtype=np.float32)
    valid = np.zeros(c.shape[:2], dtype=bool)
    for b in range(c.shape[0]):
        for k in range(c.shape[1]):
            if c[b, k].any():
                dist[b, k] = distance_transform_edt(~c[b, k], sampling=tuple(float(s) for s in spacing))
                valid[b, k] = True
    return torch.from_numpy(dist).to(masks.device, masks.dtype), torch.from_numpy(valid).to(masks.device)


def _weighted_mean(weights: Tensor, values: Tensor) -> Tensor:
    """``Σ w v / Σ w`` over the spatial axes: ``(B, K)``, 0 where the weights vanish."""
    w, v = weights.flatten(2), values.flatten(2)
    total = w.sum(dim=-1)
    return (w * v).sum(dim=-1) / total.clamp_min(1e-8)


def chamfer_directions(
    warped_masks: Tensor,
    fixed_masks: Tensor,
    spacing: Sequence[float],
    moving_masks: Tensor | None = None,
    points: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """The two directed squared Chamfer terms per ROI (see the module docstring).

    Args:
        warped_masks: ``(B, K, *shape)`` moving masks warped onto the fixed grid, soft.
        fixed_masks: ``(B, K, *shape)`` fixed masks (binarised at 0.5).
        spacing: mm per array axis of the fixed grid (the moving grid's too, when given).
        moving_masks: ``(B, K, *shape_m)`` unwarped moving masks, for a differentiable backward term.
        points: ``(B or 1, *shape, ndim)`` ``T(x)`` for every fixed voxel, in the moving grid's
            ``NORMALIZED`` frame (components ``x, y[, z]``); with ``moving_masks``.

    Returns:
        ``(forward, backward, valid)``: ``(B, K)`` mean squared distances in mm² (warped contour
        → fixed contour, fixed → warped) and ``(B, K)`` bool, ROIs with both contours present.
    """
    ndim = fixed_masks.dim() - 2
    if len(spacing) != ndim:
        raise ValueError(f"spacing has {len(spacing)} values for {ndim}-D masks")
    if warped_masks.shape != fixed_masks.shape:
        raise ValueError(f"warped masks {tuple(warped_masks.shape)} and fixed masks {tuple(fixed_masks.shape)} differ")
    d_fixed, valid_f = contour_distance(fixed_masks, spacing)
    c_warped = soft_contour(warped_masks)
    forward = _weighted_mean(c_warped, d_fixed * d_fixed)
    c_fixed = soft_contour((fixed_masks.detach() > 0.5).to(fixed_masks.dtype))
    if moving_masks is not None and points is not None:
        d_moving, valid_m = contour_distance(moving_masks, spacing)
        d_at = sample_normalized(d_moving, points, padding="border")
    elif moving_masks is None and points is None:
        d_at, valid_m = contour_distance(warped_masks, spacing)
    else:
        raise ValueError("give both moving_masks and points, or neither")
    backward = _weighted_mean(c_fixed, d_at * d_at)
    valid = valid_f & valid_m & (c_warped.flatten(2).sum(dim=-1) > 1e-6)
    return forward, backward, valid


def contour_chamfer(
    warped_moving_masks: Tensor,
    fixed_masks: Tensor,
    spacing: Sequence[float],
    moving_masks: Tensor | None = None,
    points: Tensor | None = None,
) -> Tensor:
    """Symmetric squared Chamfer distance (forward + backward), mean over valid ROIs, in mm².

    Two concentric circles of radii ``r`` and ``R`` give ``(R − r)²`` in each direction, so
    ``2 (R − r)²`` in all. Arguments as :func:`chamfer_directions`.

    Returns:
        Scalar in mm²; 0 (keeping the graph) when no ROI has both contours.
    """
    forward, backward, valid = chamfer_directions(warped_moving_masks, fixed_masks, spacing, moving_masks, points)
    per_roi = (forward + backward)[valid]
    return per_roi.mean() if per_roi.numel() else warped_moving_masks.sum() * 0


class ContourChamfer(nn.Module):
    """``weight · contour_chamfer``; the record's ``contour`` term is the unweighted value (mm²).

    Args:
        spacing: mm per array axis of the working grid.
        weight: Weight in the total.
    """

    def __init__(self, spacing: Sequence[float], weight: float = 1.0) -> None:
        super().__init__()
        self.spacing, self.weight = tuple(float(s) for s in spacing), weight

    def forward(self, warped: Tensor, fixed: Tensor, moving: Tensor | None = None, points: Tensor | None = None) -> LossRecord:
        value = contour_chamfer(warped, fixed, self.spacing, moving, points)
        return LossRecord(self.weight * value, {"contour": value})
