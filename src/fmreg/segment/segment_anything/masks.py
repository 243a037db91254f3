"""Mask utilities of SAM's automatic ("everything") mask generator.

Prompt grids, the stability score, mask IoU, bounding boxes, non-maximum suppression by mask
IoU and the removal of small holes and islands. Masks are ``(K, H, W)`` bool in array order
(rows, columns); areas are in pixels.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "mask_boxes",
    "mask_iou_matrix",
    "mask_nms",
    "point_grid",
    "remove_small_regions",
    "stability_score",
]


def point_grid(points_per_side: int) -> Tensor:
    """Regular grid of prompts, as SAM's automatic mask generator places them.

    Returns:
        ``(points_per_side**2, 2)`` float32 ``(x, y)`` in [0, 1], cell centres, i.e. the
        fraction of the image width (x, columns) and height (y, rows).
    """
    offset = 1.0 / (2 * points_per_side)
    side = torch.linspace(offset, 1 - offset, points_per_side)
    ys, xs = torch.meshgrid(side, side, indexing="ij")
    return torch.stack([xs.reshape(-1), ys.reshape(-1)], dim=-1)


def stability_score(logits: Tensor, offset: float = 1.0, threshold: float = 0.0) -> Tensor:
    """SAM's stability score: IoU of the mask at ``threshold + offset`` vs ``- offset``.

    The high-threshold mask is contained in the low-threshold one, so the IoU is the ratio of
    their areas. A mask whose area barely changes when the logit cut moves has a sharp edge.

    Args:
        logits: ``(N, H, W)`` mask logits.
        offset: Logit shift either side of ``threshold``.
        threshold: The logit at which the mask is cut (0 for SAM).

    Returns:
        ``(N,)`` float32 in [0, 1]; 0 where even the low-threshold mask is empty.
    """
    inner = (logits > threshold + offset).flatten(1).sum(1, dtype=torch.int64)
    outer = (logits > threshold - offset).flatten(1).sum(1, dtype=torch.int64)
    return torch.where(outer > 0, inner.double() / outer.clamp(min=1).double(), 0.0).float()


def mask_iou_matrix(masks: Tensor, block: int = 128) -> Tensor:
    """Pairwise IoU of binary masks.

    Args:
        masks: ``(K, H, W)`` bool.
        block: Masks converted to float at a time; bounds memory at ``2 * block * H * W``
            floats.

    Returns:
        ``(K, K)`` float32 IoU (0 between two empty masks).
    """
    k = masks.shape[0]
    flat = masks.reshape(k, -1)
    areas = flat.sum(1, dtype=torch.int64).to(torch.float32)
    inter = torch.zeros((k, k), dtype=torch.float32, device=masks.device)
    for i in range(0, k, block):
        a = flat[i : i + block].to(torch.float32)
        for j in range(i, k, block):
            b = a if j == i else flat[j : j + block].to(torch.float32)
            part = a @ b.T
            inter[i : i + block, j : j + block] = part
            inter[j : j + block, i : i + block] = part.T
    union = areas[:, None] + areas[None, :] - inter
    return torch.where(union > 0, inter / union.clamp(min=1), torch.zeros_like(inter))


def mask_boxes(masks: Tensor) -> Tensor:
    """Bounding boxes of binary masks.

    Args:
        masks: ``(K, H, W)`` bool.

    Returns:
        ``(K, 4)`` int64 ``(row0, col0, row1, col1)``, end-exclusive; all zeros for an empty
        mask.
    """
    k, h, w = masks.shape
    rows, cols = masks.any(2), masks.any(1)
    # argmax returns the first maximum, i.e. the first True; flipping gives the last.
    row0 = rows.to(torch.uint8).argmax(1)
    row1 = h - rows.flip(1).to(torch.uint8).argmax(1)
    col0 = cols.to(torch.uint8).argmax(1)
    col1 = w - cols.flip(1).to(torch.uint8).argmax(1)
    boxes = torch.stack([row0, col0, row1, col1], dim=1)
    return torch.where(rows.any(1)[:, None], boxes, torch.zeros_like(boxes))


def mask_nms(masks: Tensor, scores: Tensor, iou_thresh: float = 0.7) -> Tensor:
    """Greedy non-maximum suppression by mask IoU.

    Going down the scores, a mask is kept unless it overlaps an already kept mask with
    IoU > ``iou_thresh``. The result equals greedy NMS on the full IoU matrix, but a mask is
    only compared, inside its bounding box, with kept masks whose boxes and areas allow an
    IoU above the threshold: the full matrix costs ``K**2 * H * W`` and everything mode with
    lenient thresholds gives thousands of candidates.

    Args:
        masks: ``(K, H, W)`` bool.
        scores: ``(K,)`` higher is better.
        iou_thresh: Suppress at IoU above this.

    Returns:
        ``(K',)`` int64 indices (CPU) of the kept masks, best score first.
    """
    k = masks.shape[0]
    if k == 0:
        return torch.zeros(0, dtype=torch.int64)
    order = torch.argsort(scores.cpu(), descending=True, stable=True)
    areas = masks.flatten(1).sum(1, dtype=torch.int64).cpu()
    boxes = mask_boxes(masks).cpu()
    kept = torch.empty(k, dtype=torch.int64)
    n_kept = 0
    for idx in order.tolist():
        if n_kept:
            others = kept[:n_kept]
            box, other = boxes[idx], boxes[others]
            lo = torch.maximum(box[:2], other[:, :2])
            hi = torch.minimum(box[2:], other[:, 2:])
            overlap = (hi - lo).clamp(min=0).prod(1)
            area, other_areas = areas[idx], areas[others]
            # Intersection <= box overlap and <= the smaller area; union >= the larger area.
            bound = torch.minimum(overlap, torch.minimum(other_areas, area))
            bound = bound / torch.maximum(other_areas, area).clamp(min=1)
            near = others[bound > iou_thresh]
            if len(near):
                r0, c0, r1, c1 = box.tolist()
                mask = masks[idx, r0:r1, c0:c1]
                overlap_px = masks[:, r0:r1, c0:c1][near.to(masks.device)] & mask
                inter = overlap_px.flatten(1).sum(1, dtype=torch.int64).cpu().to(torch.float64)
                iou = inter / (area + areas[near] - inter).clamp(min=1)
                if bool((iou > iou_thresh).any()):
                    continue
        kept[n_kept] = idx
        n_kept += 1
    return kept[:n_kept].clone()


def remove_small_regions(mask: Tensor, min_area: int) -> Tensor:
    """Fill holes and drop islands smaller than ``min_area`` pixels (8-connected).

    SAM's everything mode leaves speckle at mask edges; for ROI matching a speckle is a
    spurious region that drags prototypes and centroids.

    Args:
        mask: ``(H, W)`` bool.
        min_area: Area in pixels below which a hole is filled or an island removed.

    Returns:
        ``(H, W)`` bool on the same device.
    """
    from scipy import ndimage

    if min_area <= 0:
        return mask
    out = mask.detach().cpu().numpy().copy()
    eight = np.ones((3, 3), dtype=bool)
    for fill_holes in (True, False):
        region = ~out if fill_holes else out
        labels, n = ndimage.label(region, structure=eight)
        if n == 0:
            continue
        sizes = np.bincount(labels.ravel(), minlength=n + 1)
        small = sizes < min_area
        small[0] = False  # label 0 is the complement, not a component
        if small.any():
            out[small[labels]] = fill_holes
    return torch.from_numpy(out).to(mask.device)
