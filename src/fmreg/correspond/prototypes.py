"""ROI prototypes: masked average pooling of dense features (paper 002, Eq. 5)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from fmreg.errors import FmregError
from fmreg.segment.filtering import mask_block

__all__ = ["resize_masks", "roi_prototypes"]


def resize_masks(masks: Tensor, size: tuple[int, int]) -> Tensor:
    """Resample bool masks to a feature grid as coverage fractions (``M^res`` of Eq. 5).

    Area interpolation (average pooling, also for non-integer ratios) gives each feature
    cell the fraction of its footprint that the mask covers, so a mask smaller than one
    cell still has a positive weight where it lies instead of vanishing as it would under
    nearest-neighbour resampling. Enlarging is nearest-neighbour (each cell inside one pixel).

    Args:
        masks: ``(K, H, W)`` bool (or {0, 1}) masks.
        size: ``(H', W')`` of the feature grid, covering the same field of view.

    Returns:
        ``(K, H', W')`` float32 weights in [0, 1].
    """
    m = masks.float()
    if tuple(m.shape[-2:]) == tuple(size):
        return m
    if m.shape[0] == 0:
        return m.new_zeros((0, *size))
    if size[0] <= m.shape[-2] and size[1] <= m.shape[-1]:
        return F.interpolate(m[:, None], size=size, mode="area")[:, 0]
    return F.interpolate(m[:, None], size=size, mode="nearest")[:, 0]


def roi_prototypes(features: Tensor, masks: Tensor) -> Tensor:
    """One prototype per ROI: the mask-weighted mean feature vector (Eq. 5).

    ``p_k = sum_n M_k^res(n) F(n) / sum_n M_k^res(n)`` with ``M^res`` from
    :func:`resize_masks`.

    Args:
        features: ``(C, H', W')`` dense features of the slice.
        masks: ``(K, H, W)`` bool ROI masks of the same slice (same field of view; any
            resolution).

    Returns:
        ``(K, C)`` float32 prototypes, ``(0, C)`` for no masks.

    Raises:
        FmregError: a mask is empty, so its prototype is undefined. Empty masks are a
            segmenter bug or a missing filtering step (:func:`~fmreg.segment.filtering.
            filter_proposals` drops them); silently returning zeros would make the ROI match
            nothing, or anything, depending on the similarity mapping.
    """
    if features.ndim != 3:
        raise FmregError(f"features must be (C, H', W'), got shape {tuple(features.shape)}")
    if masks.ndim != 3:
        raise FmregError(f"ROI masks must be (K, H, W), got shape {tuple(masks.shape)}")
    c, fh, fw = features.shape
    feats = features.float().reshape(c, -1)
    sums, totals = [], []
    # Blocks of masks: their float weights at full size would take K × H × W floats at once.
    step = mask_block(masks[0].numel() if masks.shape[0] else 1)
    for i in range(0, masks.shape[0], step):
        weights = resize_masks(masks[i : i + step], (fh, fw)).reshape(-1, fh * fw)
        sums.append(weights @ feats.T)
        totals.append(weights.sum(dim=1))
    if not sums:
        return feats.new_zeros((0, c))
    total = torch.cat(totals)
    empty = torch.nonzero(total <= 0).flatten().tolist()
    if empty:
        raise FmregError(
            f"ROI masks {empty[:10]} are empty: drop empty masks (filter_proposals) before "
            "computing prototypes"
        )
    return torch.cat(sums) / total[:, None]
