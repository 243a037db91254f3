"""The outlier-removing ROI filter of SAMReg (paper 002, Sec. 3.2.2 and 4.2).

Candidates from a segment-everything backend are kept when their area is plausible for an
anatomical region, their confidence and stability pass the backend thresholds, they are not
background (fmreg's addition, see :func:`filter_proposals`), and they are not mostly covered by
a better candidate.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fmreg.errors import FmregError
from fmreg.segment.base import RoiProposals

__all__ = [
    "MAX_AREA_FRAC",
    "MAX_BACKGROUND",
    "MAX_BORDER_OUTLINE",
    "MAX_OVERLAP",
    "MIN_AREA_FRAC",
    "MIN_SCORE",
    "MIN_STABILITY",
    "background_fraction",
    "border_outline_fraction",
    "filter_proposals",
    "mask_areas",
    "mask_block",
    "overlap_ratio",
    "OverlapCache",
]

# Paper 002, Sec. 4.2: ROI areas between 200 and 7000 px on its 200x200 images, kept here as
# fractions of the slice area so that they carry over to other slice sizes.
MIN_AREA_FRAC = 200 / 40000
MAX_AREA_FRAC = 7000 / 40000
# Paper 002, Sec. 4.2: "a maximum ratio of 0.8" between overlapping ROIs.
MAX_OVERLAP = 0.8
# Paper 002, Sec. 4.2: SAM's pred-iou-thresh and stability-score-thresh both set to 0.90.
MIN_SCORE = 0.90
MIN_STABILITY = 0.90
# fmreg: a region whose outline runs along the image border for more than half its length is
# cut out by the field of view (air, the table, a strip of body wall), not a delineated
# structure. On the example pairs such strips reach 0.55-0.62; anatomy in tightly cropped
# prostate images reaches 0.43.
MAX_BORDER_OUTLINE = 0.5
# fmreg: a region lying mostly outside the imaged object (air, table) is background. On the
# example pairs background regions lie 98-100 % outside, brain ROIs at most 28 %.
MAX_BACKGROUND = 0.5


def _intersections(masks: Tensor) -> tuple[Tensor, Tensor]:
    """Pairwise intersection counts ``(K, K)`` and areas ``(K,)`` of bool masks, float64.

    The product runs in float32 (exact for counts below 2**24 px) and is then widened, so
    ratios like 80 / 100 compare exactly against thresholds like 0.8.
    """
    flat = masks.reshape(masks.shape[0], -1)
    k, n = flat.shape
    inter = torch.zeros((k, k), dtype=torch.float64)
    # Blocks of masks in float: a few hundred full-size masks at once would take gigabytes.
    step = mask_block(n)
    for i in range(0, k, step):
        a = flat[i : i + step].float()
        for j in range(i, k, step):
            b = a if j == i else flat[j : j + step].float()
            block = (a @ b.T).double()
            inter[i : i + step, j : j + step] = block
            inter[j : j + step, i : i + step] = block.T
    return inter, mask_areas(masks).double()


#: Mask pixels (over all masks of a block) handled together by the pairwise and per-mask
#: reductions here: a few hundred full-size masks widened to float or int64 at once would take
#: gigabytes, and blocks of a few masks cost per-call overhead.
_BLOCK_PIXELS = 1 << 22


def mask_block(pixels_per_mask: int) -> int:
    """Masks per block of a mask stack processed piecewise: :data:`_BLOCK_PIXELS` worth, at least 16."""
    return max(16, _BLOCK_PIXELS // max(1, pixels_per_mask))


def mask_areas(masks: Tensor) -> Tensor:
    """``(K,)`` int64 pixel counts of ``(K, ...)`` bool masks.

    Summed as uint8 into int32, block by block: a bool sum widens the tensor to int64 first and
    is over ten times slower.
    """
    flat = masks.reshape(masks.shape[0], -1)
    if flat.shape[0] == 0:
        return torch.zeros(0, dtype=torch.int64)
    if flat.dtype == torch.bool:
        flat = flat.view(torch.uint8)
    step = mask_block(flat.shape[1])
    return torch.cat([flat[i : i + step].sum(1, dtype=torch.int32).long() for i in range(0, flat.shape[0], step)])


def _blockwise(fn, masks: Tensor, *args) -> Tensor:
    """``fn(masks, *args)`` over blocks of masks (:func:`mask_block`), concatenated."""
    step = mask_block(masks[0].numel() if masks.shape[0] else 1)
    if masks.shape[0] <= step:
        return fn(masks, *args)
    return torch.cat([fn(masks[i : i + step], *args) for i in range(0, masks.shape[0], step)])


def overlap_ratio(masks: Tensor) -> Tensor:
    """Pairwise overlap ``|A & B| / min(|A|, |B|)`` of bool masks.

    Args:
        masks: ``(K, H, W)`` bool.

    Returns:
        ``(K, K)`` float64 in [0, 1]; 1 where one mask lies inside the other, 0 on pairs
        involving an empty mask.
    """
    inter, area = _intersections(masks)
    smaller = torch.minimum(area[:, None], area[None, :])
    return torch.where(smaller > 0, inter / smaller.clamp_min(1), torch.zeros_like(inter))


class OverlapCache:
    """:func:`overlap_ratio` of subsets of one mask stack, computed once for the largest subset
    asked for: two filters of the same proposals (a strict one and a light one whose candidates
    include the strict one's) pay for one pairwise product.

    Args:
        masks: ``(K, H, W)`` bool.
    """

    def __init__(self, masks: Tensor) -> None:
        self.masks = masks
        self.index = torch.zeros(0, dtype=torch.long)
        self.ratio = torch.zeros((0, 0), dtype=torch.float64)

    def __call__(self, cand: Tensor) -> Tensor:
        """``(n, n)`` overlap ratios of ``masks[cand]``."""
        where = torch.full((self.masks.shape[0],), -1, dtype=torch.long)
        where[self.index] = torch.arange(self.index.numel())
        pos = where[cand]
        if cand.numel() and bool((pos >= 0).all()):
            return self.ratio[pos][:, pos]
        self.index, self.ratio = cand.clone(), overlap_ratio(self.masks[cand])
        return self.ratio


def border_outline_fraction(masks: Tensor) -> Tensor:
    """Fraction of each mask's outline that lies on the image border.

    The outline is the mask's pixels with a 4-neighbour outside the mask (outside the image
    counts as outside), so a strip along one edge of the image scores about one half.

    Args:
        masks: ``(K, H, W)`` bool.

    Returns:
        ``(K,)`` float64 in [0, 1]; 0 for an empty mask.
    """
    return _blockwise(_border_outline_fraction, masks)


def _border_outline_fraction(masks: Tensor) -> Tensor:
    m = masks.bool()
    p = torch.nn.functional.pad(m, (1, 1, 1, 1))
    interior = p[:, 1:-1, 1:-1] & p[:, :-2, 1:-1] & p[:, 2:, 1:-1] & p[:, 1:-1, :-2] & p[:, 1:-1, 2:]
    outline = m & ~interior
    edge = torch.ones(m.shape[1:], dtype=torch.bool)
    edge[1:-1, 1:-1] = False
    on_edge = mask_areas(outline & edge).double()
    return on_edge / mask_areas(outline).double().clamp_min(1)


def background_fraction(masks: Tensor, object_mask: Tensor) -> Tensor:
    """Fraction of each mask outside the imaged object.

    Args:
        masks: ``(K, H, W)`` bool.
        object_mask: ``(H, W)`` bool, the imaged object (see
            :func:`fmreg.segment.object.object_mask`).

    Returns:
        ``(K,)`` float64 in [0, 1]; 0 for an empty mask.
    """
    return _blockwise(_background_fraction, masks, object_mask)


def _background_fraction(masks: Tensor, object_mask: Tensor) -> Tensor:
    m = masks.bool()
    outside = mask_areas(m & ~object_mask.bool()[None]).double()
    return outside / mask_areas(m).double().clamp_min(1)


def filter_proposals(
    props: RoiProposals,
    *,
    min_area_frac: float = MIN_AREA_FRAC,
    max_area_frac: float = MAX_AREA_FRAC,
    max_overlap: float = MAX_OVERLAP,
    min_score: float = MIN_SCORE,
    min_stability: float = MIN_STABILITY,
    max_border_outline: float | None = None,
    object_mask: Tensor | None = None,
    max_background: float = MAX_BACKGROUND,
    overlaps: OverlapCache | None = None,
) -> RoiProposals:
    """Drop implausible and redundant ROI candidates.

    Rules, in order:

    1. empty masks are dropped;
    2. masks with area outside ``[min_area_frac, max_area_frac] * H * W`` (inclusive) are
       dropped;
    3. masks with ``score < min_score`` or ``stability < min_stability`` are dropped, and (fmreg)
       background: masks whose outline lies on the image border for more than
       ``max_border_outline`` (:func:`border_outline_fraction`), and masks lying more than
       ``max_background`` outside ``object_mask`` (:func:`background_fraction`);
    4. the rest are visited by descending score (ties: higher stability, then lower index);
       a mask is dropped when its overlap ``|A & B| / min(|A|, |B|)`` with an already kept
       mask exceeds ``max_overlap``, so of two overlapping masks the higher-scoring stays.

    Args:
        props: candidates of one ``(H, W)`` slice.
        min_area_frac, max_area_frac: area bounds as fractions of ``H * W`` (paper: 200 and
            7000 px of 200x200).
        max_overlap: largest allowed overlap ratio between two kept masks (paper: 0.8).
        min_score, min_stability: lowest kept confidence and stability (paper: 0.90, SAM's
            calibration; other backends may need their own values).
        max_border_outline: None keeps regions at the border (the paper's filter);
            :data:`MAX_BORDER_OUTLINE` drops strips cut out by the field of view.
        object_mask: ``(H, W)`` bool, the imaged object; None (unknown) skips the background rule.
        max_background: Largest kept fraction of a mask outside ``object_mask``.
        overlaps: Pairwise overlaps of ``props.masks`` shared with another filter of the same
            proposals (:class:`OverlapCache`); None computes them here.

    Returns:
        The kept candidates, in their original relative order.
    """
    masks = props.masks
    if masks.ndim != 3:
        raise FmregError(f"ROI masks must be (K, H, W), got shape {tuple(masks.shape)}")
    if not 0.0 <= min_area_frac <= max_area_frac:
        raise FmregError(
            f"area bounds must satisfy 0 <= min_area_frac <= max_area_frac, got "
            f"{min_area_frac} and {max_area_frac}"
        )
    k, h, w = masks.shape
    if k == 0:
        return props
    masks = masks.bool()
    area = mask_areas(masks)
    n_px = h * w
    # Small tolerance so that a bound given as e.g. 200/40000 keeps exactly 200 px.
    eps = 1e-9 * n_px
    ok = (area > 0) & (area >= min_area_frac * n_px - eps) & (area <= max_area_frac * n_px + eps)
    ok &= (props.scores >= min_score) & (props.stability >= min_stability)
    # Before the overlap rule: a background region must not suppress the ROI it overlaps.
    if max_border_outline is not None:
        ok &= border_outline_fraction(masks) <= max_border_outline
    if object_mask is not None:
        ok &= background_fraction(masks, object_mask) <= max_background
    overlaps = overlaps or OverlapCache(masks)
    return props.select(_non_overlapping(props, overlaps, torch.nonzero(ok).flatten(), max_overlap))


def _non_overlapping(props: RoiProposals, overlaps: OverlapCache, cand: Tensor, max_overlap: float) -> Tensor:
    """Indices of ``cand`` kept by the overlap rule (rule 4 of :func:`filter_proposals`), sorted."""
    if cand.numel() == 0:
        return cand
    # Stable descending sort on (score, stability): index order breaks the remaining ties.
    sub_scores = props.scores[cand].double()
    sub_stab = props.stability[cand].double()
    order = sorted(
        range(cand.numel()), key=lambda i: (-float(sub_scores[i]), -float(sub_stab[i]), i)
    )
    ratio = overlaps(cand).numpy()
    kept: list[int] = []
    for i in order:
        if not kept or bool((ratio[i, kept] <= max_overlap).all()):
            kept.append(i)
    return cand[torch.tensor(sorted(kept), dtype=torch.long)]
