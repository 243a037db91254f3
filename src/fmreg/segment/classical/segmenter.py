"""A weight-free segment-everything backend: classical multi-scale region proposals.

:class:`ClassicalSegmenter` stands in for SAM's "everything" mode (paper 002, Eq. 4). Three
families of partitions (:mod:`~fmreg.segment.classical.partitions`: graph-based
segmentation, merged watershed superpixels, multi-Otsu bands) propose regions, and every
region gets SAM's two quality numbers:

* ``stability`` (SAM: IoU of the mask at two logit thresholds): the best IoU with a region
  of a neighbouring scale/level, or for an Otsu region the worse of its best IoUs at the
  thresholds shifted by -delta and +delta;
* ``scores`` (SAM: predicted IoU): how clearly the region is delineated: the share of its
  contour lying on image edges, lowered when a strong edge runs through its core
  (:func:`~fmreg.segment.classical.candidates.contour_score`).

These are not calibrated like SAM's numbers: with :func:`~fmreg.segment.filtering.
filter_proposals` use :attr:`ClassicalSegmenter.filter_thresholds` (``RECOMMENDED_MIN_SCORE``
and ``RECOMMENDED_MIN_STABILITY``) instead of the paper's 0.90
(:data:`~fmreg.segment.filtering.MIN_SCORE`), which keeps only a handful of ROIs per slice.
All arrays use the order (H, W) = (rows, columns); sizes are in pixels.
"""

from __future__ import annotations

import math
from types import MappingProxyType

import numpy as np
import torch
from torch import Tensor

from fmreg.core.intensity import normalize
from fmreg.segment.base import RoiProposals
from fmreg.segment.classical.candidates import (
    EDGE_FLOOR,
    EDGE_REF,
    EDGE_REL_REF,
    Candidate,
    collect,
    contour_score,
    dedupe,
    edge_strength,
    upsample_into,
)
from fmreg.segment.classical.common import as_slice, check_options, resize_area
from fmreg.segment.classical.partitions import (
    best_iou,
    felzenszwalb_levels,
    sequence_stability,
    threshold_levels,
    watershed_levels,
)

__all__ = [
    "RECOMMENDED_MIN_SCORE",
    "RECOMMENDED_MIN_STABILITY",
    "ClassicalSegmenter",
    "propose_regions",
]

# Proposal defaults, tuned by eye on the 2D SAMReg example pairs (cardiac, prostate, brain,
# abdomen, lung) at a working size of 256 px. Scales and levels are spaced by ~1.5x so that
# neighbouring levels are close enough for stability to mean "persists under a small change".
WORK_SIZE = 256
FELZENSZWALB_SCALES = (60.0, 100.0, 160.0, 250.0, 400.0, 630.0, 1000.0)
WATERSHED_MARKERS = 300
MERGE_LEVELS = (0.03, 0.045, 0.065, 0.09, 0.13, 0.18)
OTSU_CLASSES = (2, 3, 4)
THRESHOLD_DELTA = 0.02
MIN_REGION_FRAC = 0.003
MAX_REGION_FRAC = 0.5
DEDUPE_IOU = 0.9
# filter_proposals thresholds for these scores and stabilities: on the example pairs they
# keep ~5-40 ROIs per slice, where the paper's SAM-calibrated 0.90 keeps 1-18.
RECOMMENDED_MIN_SCORE = 0.7
RECOMMENDED_MIN_STABILITY = 0.8


def _equalize(img: np.ndarray, bins: int = 256) -> np.ndarray:
    """Global histogram equalisation of a [0, 1] image (values become their CDF, [0, 1])."""
    hist, edges = np.histogram(img, bins=bins, range=(0.0, 1.0))
    cdf = np.cumsum(hist).astype(np.float64)
    cdf /= cdf[-1]
    centers = 0.5 * (edges[:-1] + edges[1:])
    return np.interp(img, centers, cdf).astype(np.float32)


def _working_images(
    arr: np.ndarray, work_size: int, smooth_sigma: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The slice at working size, normalised to [0, 1], in the variants the families use.

    Args:
        arr: ``(H, W)`` float32 slice, any intensity range.
        work_size: longest side of the working slice in pixels (never enlarged).
        smooth_sigma: Gaussian sigma in working pixels.

    Returns:
        ``(work, smooth, eq, eq_smooth)``, each ``(h, w)`` float32: the working slice, it
        smoothed, it half-equalised, and that smoothed.
    """
    from skimage.filters import gaussian

    shape = arr.shape
    scale = min(1.0, work_size / max(shape))
    wshape = (max(8, round(shape[0] * scale)), max(8, round(shape[1] * scale)))
    work = resize_area(normalize(arr), wshape)
    smooth = gaussian(work, sigma=smooth_sigma, preserve_range=True).astype(np.float32)
    # Half-equalised copy for graph segmentation, superpixels and edge scores: it stretches
    # the intensity ranges that most pixels occupy (soft tissue in CT, whose robust range
    # spans air to bone) while keeping part of the original contrast. Otsu bands use the
    # plain image: equalising would flatten the histogram valleys they look for.
    eq = (0.5 * work + 0.5 * _equalize(work)).astype(np.float32)
    eq_smooth = gaussian(eq, sigma=smooth_sigma, preserve_range=True).astype(np.float32)
    return work, smooth, eq, eq_smooth


def _gather_candidates(
    smooth: np.ndarray,
    eq: np.ndarray,
    eq_smooth: np.ndarray,
    *,
    felzenszwalb_scales: tuple[float, ...],
    watershed_markers: int,
    merge_levels: tuple[float, ...],
    otsu_classes: tuple[int, ...],
    threshold_delta: float,
    min_px: int,
    max_px: int,
) -> list[Candidate]:
    """Regions of every proposal family, with their stabilities (scores still 0)."""
    cands: list[Candidate] = []
    if felzenszwalb_scales:
        levels = felzenszwalb_levels(eq, tuple(felzenszwalb_scales), min_px)
        collect(levels, sequence_stability(levels), min_px, max_px, cands)
    if watershed_markers > 0 and merge_levels:
        levels = watershed_levels(eq_smooth, watershed_markers, tuple(merge_levels))
        collect(levels, sequence_stability(levels), min_px, max_px, cands)
    for base, shifted in threshold_levels(smooth, tuple(otsu_classes), threshold_delta):
        # Both shifts must leave the region intact, as in SAM's stability (IoU of the mask
        # at the lower and at the higher threshold): the worse of the two counts.
        stab = np.minimum(*(best_iou(base, s)[0] for s in shifted))
        collect([base], [stab], min_px, max_px, cands)
    return cands


def _to_proposals(
    cands: list[Candidate], shape: tuple[int, int], wshape: tuple[int, int]
) -> RoiProposals:
    """Candidates on the ``wshape`` working grid as proposals on the ``shape`` input grid."""
    masks = np.zeros((len(cands), *shape), dtype=bool)
    for k, c in enumerate(cands):
        if wshape == shape:
            masks[k, c.r0 : c.r1, c.c0 : c.c1] = c.mask
        else:
            upsample_into(masks[k], c, wshape)
    scores = torch.tensor([c.score for c in cands], dtype=torch.float32).clamp(0, 1)
    stab = torch.tensor([c.stability for c in cands], dtype=torch.float32).clamp(0, 1)
    return RoiProposals(torch.from_numpy(masks), scores, stab)


def propose_regions(
    image: Tensor | np.ndarray,
    *,
    work_size: int = WORK_SIZE,
    felzenszwalb_scales: tuple[float, ...] = FELZENSZWALB_SCALES,
    watershed_markers: int = WATERSHED_MARKERS,
    merge_levels: tuple[float, ...] = MERGE_LEVELS,
    otsu_classes: tuple[int, ...] = OTSU_CLASSES,
    threshold_delta: float = THRESHOLD_DELTA,
    smooth_sigma: float = 1.0,
    min_region_frac: float = MIN_REGION_FRAC,
    max_region_frac: float = MAX_REGION_FRAC,
    dedupe_iou: float = DEDUPE_IOU,
    edge_ref: float = EDGE_REF,
    edge_rel_ref: float = EDGE_REL_REF,
) -> RoiProposals:
    """Segment everything in one slice with classical multi-scale region proposals.

    Args:
        image: ``(H, W)`` slice, any intensity range; normalised by the 1st/99th percentiles.
        work_size: slices whose longer side exceeds this many pixels are proposed at this size
            (area-averaged) and the masks are resampled back, bounding the run time.
        felzenszwalb_scales: graph-segmentation scales, fine to coarse (empty disables).
        watershed_markers: number of compact-watershed superpixels (0 disables).
        merge_levels: normalised-intensity differences below which neighbouring superpixels
            are merged, one partition per level, fine to coarse.
        otsu_classes: multi-Otsu class counts; each band's connected components are regions.
        threshold_delta: shift of the Otsu thresholds (normalised intensity) used to measure
            the stability of the band regions.
        smooth_sigma: Gaussian sigma (working pixels) applied before thresholding/watershed.
        min_region_frac, max_region_frac: regions smaller/larger than these fractions of the
            slice area are not proposed.
        dedupe_iou: candidates overlapping with at least this IoU are merged into one.
        edge_ref: gradient magnitude (normalised intensity per pixel) at which a contour
            pixel counts ``1 - 1/e`` towards ``scores`` (see
            :func:`~fmreg.segment.classical.candidates.edge_strength`).
        edge_rel_ref: ratio of the gradient to its local mean at which a contour pixel
            counts ``1 - 1/e`` (whichever of the two criteria is stronger applies).

    Returns:
        :class:`RoiProposals` on the input grid ``(H, W)``, sorted by descending score:
        ``scores`` = how clearly edges delineate the region
        (:func:`~fmreg.segment.classical.candidates.contour_score`),
        ``stability`` = best-IoU persistence across neighbouring levels; both in [0, 1].
        Hole-filled variants of ring-shaped regions inherit the ring's stability.
    """
    arr = as_slice(image)
    shape = arr.shape
    _, smooth, eq, eq_smooth = _working_images(arr, work_size, smooth_sigma)
    wshape = eq.shape
    n_px = wshape[0] * wshape[1]
    min_px = max(4, int(math.ceil(min_region_frac * n_px)))
    max_px = int(max_region_frac * n_px)
    cands = _gather_candidates(
        smooth,
        eq,
        eq_smooth,
        felzenszwalb_scales=felzenszwalb_scales,
        watershed_markers=watershed_markers,
        merge_levels=merge_levels,
        otsu_classes=otsu_classes,
        threshold_delta=threshold_delta,
        min_px=min_px,
        max_px=max_px,
    )
    if not cands:
        return RoiProposals.empty(shape)
    edge, edge_abs = edge_strength(eq, edge_ref, edge_rel_ref, EDGE_FLOOR)
    for c in cands:
        c.score = contour_score(c, edge, edge_abs)
    cands = dedupe(cands, dedupe_iou)
    cands.sort(key=lambda c: (-c.score, -c.stability, -c.area))
    return _to_proposals(cands, shape, wshape)


class ClassicalSegmenter:
    """Segmenter ``"classical"``: :func:`propose_regions` with fixed keyword options.

    Args:
        **options: keyword arguments of :func:`propose_regions`.

    Attributes:
        filter_thresholds: ``min_score`` / ``min_stability`` keywords for
            :func:`~fmreg.segment.filtering.filter_proposals` suited to this backend's scores.
    """

    name = "classical"
    filter_thresholds = MappingProxyType(
        {"min_score": RECOMMENDED_MIN_SCORE, "min_stability": RECOMMENDED_MIN_STABILITY}
    )

    def __init__(self, **options) -> None:
        check_options(propose_regions, options, "classical segmenter")
        self.options = options

    def segment(self, image: Tensor) -> RoiProposals:
        """Args: image: ``(H, W)`` slice. Returns its candidate ROIs (:func:`propose_regions`)."""
        return propose_regions(image, **self.options)
