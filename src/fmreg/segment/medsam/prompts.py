"""LiteMedSAM's input and its box prompts for "everything" mode.

LiteMedSAM answers box prompts only (a point prompt gives an empty mask: it was trained on
boxes), so everything mode prompts it with boxes: a grid of boxes at several sizes whose
positions overlap, and optionally the bounding boxes of other proposals (the classical
segmenter's), which sit on objects.

Frames: a slice is ``(H, W)`` (rows, columns). The model input is 256 x 256 pixels holding
the slice resized so its longest side is 256, at the top-left corner (``resized_hw`` = its
``(h, w)``); a box is ``(x0, y0, x1, y1)`` = (first column, first row, last column, last
row) in input pixels, as LiteMedSAM was trained (corners inclusive).
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor

from fmreg.core.intensity import normalize
from fmreg.segment.segment_anything.masks import mask_boxes
from fmreg.segment.segment_anything.preprocessing import pad_bottom_right, resize_longest_side

__all__ = ["box_iou", "distinct_boxes", "grid_boxes", "mask_prompt_boxes", "preprocess"]


def preprocess(image: Tensor, image_size: int, window: tuple[float, float]) -> tuple[Tensor, tuple[int, int]]:
    """One slice as LiteMedSAM's input.

    Intensities go to [0, 1] through a percentile window: LiteMedSAM min-max normalises its
    input, and MedSAM's data preparation had clipped MR at the 0.5 / 99.5 percentiles (CT at
    a window) before that, which the default window reproduces for raw slices. The longest
    side is then resized to ``image_size`` and the square padded bottom/right with 0; grey
    goes to all three channels.

    Args:
        image: ``(H, W)`` float slice, any intensity range.
        image_size: Side of the square model input (256).
        window: Percentiles mapped to 0 and 1.

    Returns:
        ``(1, 3, image_size, image_size)`` float32 in [0, 1] and the ``(h, w)`` of the
        resized slice inside it.
    """
    scaled = normalize(image.detach(), *window)[None, None]
    resized = resize_longest_side(scaled, image_size).clamp(0.0, 1.0)
    resized_hw = (int(resized.shape[-2]), int(resized.shape[-1]))
    padded = pad_bottom_right(resized, image_size)
    return padded.expand(1, 3, -1, -1).contiguous(), resized_hw


def _starts(extent: int, size: float, stride: float) -> Tensor:
    """First pixels of boxes of ``size`` every ``stride`` along ``extent`` pixels; the last box
    ends at the edge so the whole extent is covered."""
    if size >= extent:
        return torch.zeros(1)
    n = math.ceil((extent - size) / stride) + 1
    return torch.linspace(0.0, extent - size, n)


def grid_boxes(resized_hw: tuple[int, int], sizes: Sequence[float], overlap: float) -> Tensor:
    """Square boxes on a regular grid at several sizes.

    Args:
        resized_hw: ``(h, w)`` of the slice inside the model input; boxes stay inside it.
        sizes: Box sides as fractions of the slice's longest side (e.g. 0.25 and 0.5).
        overlap: Fraction of a box side that neighbouring boxes share (stride =
            ``size * (1 - overlap)``).

    Returns:
        ``(N, 4)`` float32 ``(x0, y0, x1, y1)`` in input pixels, larger boxes first.
    """
    h, w = resized_hw
    out = []
    for frac in sorted(sizes, reverse=True):
        side = frac * max(h, w)
        stride = max(1.0, side * (1.0 - overlap))
        ys, xs = _starts(h, side, stride), _starts(w, side, stride)
        y0, x0 = torch.meshgrid(ys, xs, indexing="ij")
        y0, x0 = y0.reshape(-1), x0.reshape(-1)
        y1 = (y0 + side).clamp(max=h) - 1
        x1 = (x0 + side).clamp(max=w) - 1
        out.append(torch.stack([x0, y0, x1, y1], dim=1))
    return torch.cat(out) if out else torch.zeros(0, 4)


def mask_prompt_boxes(masks: Tensor, resized_hw: tuple[int, int], margin: float) -> Tensor:
    """Bounding boxes of masks as box prompts, enlarged by a margin.

    MedSAM was trained with boxes a few pixels larger than the object (randomly jittered),
    so a tight box is widened by ``margin`` times its side on each end.

    Args:
        masks: ``(K, H, W)`` bool masks on the slice.
        resized_hw: ``(h, w)`` of the slice inside the model input.
        margin: Fraction of each box side added at both ends.

    Returns:
        ``(K', 4)`` float32 ``(x0, y0, x1, y1)`` input pixels, of the non-empty masks.
    """
    masks = masks[masks.flatten(1).any(1)]
    if masks.shape[0] == 0:
        return torch.zeros(0, 4)
    h, w = masks.shape[-2:]
    scale = torch.tensor([resized_hw[1] / w, resized_hw[0] / h] * 2)
    r0, c0, r1, c1 = mask_boxes(masks).to(torch.float32).unbind(1)
    # End-exclusive slice pixels to inclusive input pixels.
    boxes = torch.stack([c0, r0, c1, r1], dim=1) * scale - torch.tensor([0.0, 0.0, 1.0, 1.0])
    pad = margin * (boxes[:, 2:] - boxes[:, :2] + 1)
    boxes = torch.cat([boxes[:, :2] - pad, boxes[:, 2:] + pad], dim=1)
    upper = torch.tensor([resized_hw[1] - 1, resized_hw[0] - 1] * 2, dtype=torch.float32)
    return torch.minimum(boxes.clamp(min=0.0), upper)


def box_iou(a: Tensor, b: Tensor) -> Tensor:
    """IoU of inclusive pixel boxes: ``a`` ``(N, 4)``, ``b`` ``(M, 4)`` -> ``(N, M)``."""
    lo = torch.maximum(a[:, None, :2], b[None, :, :2])
    hi = torch.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = (hi - lo + 1).clamp(min=0).prod(-1)
    area_a = (a[:, 2:] - a[:, :2] + 1).prod(-1)
    area_b = (b[:, 2:] - b[:, :2] + 1).prod(-1)
    return inter / (area_a[:, None] + area_b[None, :] - inter).clamp(min=1e-6)


def distinct_boxes(boxes: Tensor, max_iou: float, limit: int) -> Tensor:
    """Up to ``limit`` of ``boxes`` (in order), skipping any box whose IoU with an already
    taken one exceeds ``max_iou``.

    Nested or shifted-by-a-pixel proposals give near-identical boxes and so near-identical
    masks; every decoded box costs as much as any other, so the budget goes to distinct ones.

    Args:
        boxes: ``(N, 4)`` ``(x0, y0, x1, y1)``, best first.

    Returns:
        ``(K, 4)``, ``K <= limit``.
    """
    if boxes.shape[0] == 0 or limit <= 0:
        return boxes[:0]
    iou = box_iou(boxes, boxes)
    taken: list[int] = []
    for i in range(boxes.shape[0]):
        if not taken or bool((iou[i, taken] <= max_iou).all()):
            taken.append(i)
            if len(taken) == limit:
                break
    return boxes[taken]
