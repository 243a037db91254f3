"""A weight-free segment-everything backend and a handcrafted prototype encoder.

:class:`ClassicalSegmenter` stands in for SAM's "everything" mode (paper 002, Eq. 4) with
classical multi-scale region proposals; :class:`ClassicalEncoder` stands in for SAM's image
encoder (Eq. 3) with handcrafted features whose masked averages (Eq. 5) compare well under
cosine similarity (Eq. 6). Neither needs a download, so SAMReg runs anywhere.

Proposal families (each yields a sequence of partitions of the slice, ordered from fine to
coarse, so that every region has neighbouring levels to be compared with):

* graph-based segmentation (Felzenszwalb-Huttenlocher) at several scales;
* watershed superpixels merged at several intensity-difference levels;
* multi-Otsu bands (2, 3, 4 classes) split into connected components, each band map also
  computed with all thresholds shifted by -delta and by +delta.

Every region gets SAM's two quality numbers:

* ``stability`` (SAM: IoU of the mask at two logit thresholds): the best IoU with a region
  of a neighbouring scale/level, or for an Otsu region the worse of its best IoUs at the
  thresholds shifted by -delta and +delta;
* ``scores`` (SAM: predicted IoU): how clearly the region is delineated: the share of its
  contour lying on image edges, lowered when a strong edge runs through its core
  (:func:`_contour_score`).

These are not calibrated like SAM's numbers: with :func:`~fmreg.segment.filtering.
filter_proposals` use :attr:`ClassicalSegmenter.filter_thresholds` (``RECOMMENDED_MIN_SCORE``
and ``RECOMMENDED_MIN_STABILITY``) instead of the paper's 0.90, which keeps only a handful of
ROIs per slice. All arrays use the order (H, W) = (rows, columns); sizes are in pixels.
"""

from __future__ import annotations

import math
from types import MappingProxyType

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage as ndi
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components
from torch import Tensor

from fmreg.core.intensity import normalize, resize
from fmreg.errors import FmregError
from fmreg.segment.base import RoiProposals

__all__ = [
    "RECOMMENDED_MIN_SCORE",
    "RECOMMENDED_MIN_STABILITY",
    "ClassicalEncoder",
    "ClassicalSegmenter",
    "classical_features",
    "gaussian_blur",
    "mind_ssc",
    "propose_regions",
    "soft_histogram",
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
# A step of 1/10 of the robust intensity range peaks at ~0.04 per pixel after sigma-1
# smoothing: such an edge counts 1 - 1/e, a step of a fifth of the range counts ~0.98.
EDGE_REF = 0.04
# ...or an edge three times stronger than the mean gradient around it (texture and noise).
EDGE_REL_REF = 3.0
# A region whose core has a median edge strength of 3 (in the units above) lies on an edge
# rather than between edges: its score is divided by e.
CORE_EDGE_REF = 3.0
# Mean gradient below which a neighbourhood counts as flat (normalised units per pixel).
EDGE_FLOOR = 0.005
# filter_proposals thresholds for these scores and stabilities: on the example pairs they
# keep ~5-40 ROIs per slice, where the paper's SAM-calibrated 0.90 keeps 1-18.
RECOMMENDED_MIN_SCORE = 0.7
RECOMMENDED_MIN_STABILITY = 0.8


# --------------------------------------------------------------------------- intensities


def _equalize(img: np.ndarray, bins: int = 256) -> np.ndarray:
    """Global histogram equalisation of a [0, 1] image (values become their CDF, [0, 1])."""
    hist, edges = np.histogram(img, bins=bins, range=(0.0, 1.0))
    cdf = np.cumsum(hist).astype(np.float64)
    cdf /= cdf[-1]
    centers = 0.5 * (edges[:-1] + edges[1:])
    return np.interp(img, centers, cdf).astype(np.float32)


def _as_slice(image: Tensor | np.ndarray) -> np.ndarray:
    arr = image.detach().cpu().numpy() if isinstance(image, Tensor) else np.asarray(image)
    if arr.ndim != 2:
        raise FmregError(f"expected a 2D (H, W) slice, got shape {tuple(arr.shape)}")
    if min(arr.shape) < 8:
        raise FmregError(f"slice {tuple(arr.shape)} is too small to segment: need 8x8 or more")
    arr = arr.astype(np.float32, copy=False)
    if not np.isfinite(arr).all():
        raise FmregError("slice contains NaN/Inf intensities")
    return arr


def _resize(img: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Area-average resize (anti-aliased when shrinking)."""
    if img.shape == shape:
        return img
    return resize(torch.from_numpy(np.ascontiguousarray(img, dtype=np.float32))[None], shape, mode="area")[0].numpy()


def _upsample_labels(labels: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour upsampling of a label map (pixel centres map to pixel centres)."""
    h, w = labels.shape
    rows = np.minimum(((np.arange(shape[0]) + 0.5) * h / shape[0]).astype(np.intp), h - 1)
    cols = np.minimum(((np.arange(shape[1]) + 0.5) * w / shape[1]).astype(np.intp), w - 1)
    return labels[rows[:, None], cols[None, :]]


# --------------------------------------------------------------------------- partitions


def _felzenszwalb_levels(
    work: np.ndarray, scales: tuple[float, ...], min_px: int
) -> list[np.ndarray]:
    from skimage.segmentation import felzenszwalb

    # Graph segmentation is the slowest step; at half resolution it is ~6x faster and the
    # regions we want (organs, cavities) are far larger than the 2-pixel staircase it causes.
    half_shape = (max(8, work.shape[0] // 2), max(8, work.shape[1] // 2))
    half = _resize(work, half_shape)
    min_size = max(4, min_px // 4)
    return [
        _upsample_labels(felzenszwalb(half, scale=s, sigma=0.8, min_size=min_size), work.shape)
        for s in scales
    ]


def _watershed_levels(
    smooth: np.ndarray, n_markers: int, levels: tuple[float, ...]
) -> list[np.ndarray]:
    from skimage.filters import sobel
    from skimage.segmentation import watershed

    # Superpixels only seed the merging, so half resolution is plenty (and ~4x faster).
    half = _resize(smooth, (max(8, smooth.shape[0] // 2), max(8, smooth.shape[1] // 2)))
    sp = watershed(sobel(half), markers=n_markers, compactness=1e-4) - 1
    n = int(sp.max()) + 1
    counts = np.bincount(sp.ravel(), minlength=n).astype(np.float64)
    means = np.bincount(sp.ravel(), weights=half.ravel(), minlength=n) / np.maximum(counts, 1)
    a = np.concatenate([sp[:, :-1].ravel(), sp[:-1, :].ravel()])
    b = np.concatenate([sp[:, 1:].ravel(), sp[1:, :].ravel()])
    edge = a != b
    lo, hi = np.minimum(a[edge], b[edge]), np.maximum(a[edge], b[edge])
    pairs = np.unique(np.stack([lo, hi]), axis=1)
    diff = np.abs(means[pairs[0]] - means[pairs[1]])
    out = []
    for t in levels:
        # Single-linkage merging of superpixels whose mean intensities differ by less than t:
        # one connected-components call per level instead of an agglomeration loop.
        keep = diff < t
        graph = coo_matrix(
            (np.ones(int(keep.sum())), (pairs[0, keep], pairs[1, keep])), shape=(n, n)
        )
        _, comp = connected_components(graph, directed=False)
        out.append(_upsample_labels(comp[sp], smooth.shape))
    return out


def _band_components(smooth: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    from skimage.measure import label

    bands = np.digitize(smooth, thresholds).astype(np.int32)
    # background=-1: every band, the darkest included, is a candidate region.
    return label(bands, background=-1, connectivity=1) - 1


def _threshold_levels(
    smooth: np.ndarray, classes: tuple[int, ...], delta: float
) -> list[tuple[np.ndarray, list[np.ndarray]]]:
    """Per class count: the partition at the multi-Otsu thresholds t and those at t -+ delta."""
    from skimage.filters import threshold_multiotsu

    hist, edges = np.histogram(smooth, bins=128, range=(0.0, 1.0))
    centers = 0.5 * (edges[:-1] + edges[1:])
    out = []
    for n in classes:
        try:
            t_idx = threshold_multiotsu(classes=n, hist=hist)
        except ValueError:
            continue  # too few distinct intensities for n classes
        # With `hist` alone skimage returns bin indices; map them to intensities.
        t = np.interp(np.asarray(t_idx, dtype=np.float64), np.arange(len(centers)), centers)
        base = _band_components(smooth, t)
        shifted = [_band_components(smooth, t - delta), _band_components(smooth, t + delta)]
        out.append((base, shifted))
    return out


def _best_iou(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Best IoU of every region of partition ``a`` with any region of ``b``, and vice versa.

    Both are label maps 0..n-1 of the same shape; the contingency table is built sparsely so
    that noisy partitions with thousands of components stay cheap.
    """
    na, nb = int(a.max()) + 1, int(b.max()) + 1
    key = a.ravel().astype(np.int64) * nb + b.ravel()
    pair, inter = np.unique(key, return_counts=True)
    ia, ib = pair // nb, pair % nb
    area_a = np.bincount(a.ravel(), minlength=na)
    area_b = np.bincount(b.ravel(), minlength=nb)
    iou = inter / (area_a[ia] + area_b[ib] - inter)
    best_a = np.zeros(na)
    best_b = np.zeros(nb)
    np.maximum.at(best_a, ia, iou)
    np.maximum.at(best_b, ib, iou)
    return best_a, best_b


def _sequence_stability(levels: list[np.ndarray]) -> list[np.ndarray]:
    """Best IoU of each region with any region of a neighbouring level (previous or next).

    The better neighbour counts: a structure that survives one scale step (say it merges
    with its surroundings only at the next coarser scale) is persistent, as a SAM mask that
    barely changes under a small threshold shift is.
    """
    best = [np.zeros(int(lv.max()) + 1) for lv in levels]
    for i in range(len(levels) - 1):
        fwd, bwd = _best_iou(levels[i], levels[i + 1])
        np.maximum(best[i], fwd, out=best[i])
        np.maximum(best[i + 1], bwd, out=best[i + 1])
    return best


# --------------------------------------------------------------------------- candidates


class _Candidate:
    """One region: a bool crop ``mask`` placed at rows ``r0:r1``, columns ``c0:c1``."""

    __slots__ = ("r0", "r1", "c0", "c1", "mask", "area", "stability", "score")

    def __init__(self, r0: int, c0: int, mask: np.ndarray, stability: float) -> None:
        self.r0, self.c0 = r0, c0
        self.r1, self.c1 = r0 + mask.shape[0], c0 + mask.shape[1]
        self.mask = mask
        self.area = int(np.count_nonzero(mask))
        self.stability = float(stability)
        self.score = 0.0


def _fill_holes(mask: np.ndarray, max_hole: int) -> tuple[np.ndarray, np.ndarray]:
    """Fill holes of at most ``max_hole`` px; also return the mask with every hole filled.

    A hole is a background component that does not touch the crop border; regions touching
    the image border keep their open "bays".
    """
    lab, n = ndi.label(~mask)
    if n <= 1:
        return mask, mask
    outside = np.unique(np.concatenate([lab[0], lab[-1], lab[:, 0], lab[:, -1]]))
    hole = np.ones(n + 1, dtype=bool)
    hole[0] = False
    hole[outside] = False
    if not hole.any():
        return mask, mask
    sizes = np.bincount(lab.ravel(), minlength=n + 1)
    small = hole & (sizes <= max_hole)
    return mask | small[lab], mask | hole[lab]


# Disk of radius 2 px: opening with it removes everything narrower than ~5 px.
_DISK2 = np.array(
    [[0, 1, 1, 1, 0], [1, 1, 1, 1, 1], [1, 1, 1, 1, 1], [1, 1, 1, 1, 1], [0, 1, 1, 1, 0]],
    dtype=bool,
)


def _collect(
    levels: list[np.ndarray],
    stability: list[np.ndarray],
    min_px: int,
    max_px: int,
    out: list[_Candidate],
    min_solid: float = 0.6,
) -> None:
    """Append every region of the partitions whose area lies in ``[min_px, max_px]``."""
    for lv, stab in zip(levels, stability):
        areas = np.bincount(lv.ravel())
        ok = np.flatnonzero((areas >= min_px) & (areas <= max_px))
        if ok.size == 0:
            continue
        objs = ndi.find_objects(lv + 1)
        for r in ok:
            sl = objs[r]
            mask = lv[sl] == r
            # Noise speckles of another band punch small holes into threshold regions; the
            # structure is the region with them filled. Large holes are real (a ring around a
            # cavity), so the region with them filled is a second, separate candidate.
            mask, filled = _fill_holes(mask, min_px)
            # Thin partial-volume strips along strong edges (an Otsu band between a bright
            # and a dark structure) and spurs are no anatomical ROI: remove everything
            # narrower than ~5 px and drop the region if most of it goes. (Wider strips are
            # left to the core-edge term of the score.)
            opened = ndi.binary_opening(mask, structure=_DISK2)
            if np.count_nonzero(opened) < min_solid * np.count_nonzero(mask):
                continue
            mask, filled = opened, filled & ~(mask & ~opened)
            cand = _Candidate(sl[0].start, sl[1].start, mask, stab[r])
            out.append(cand)
            n_filled = int(np.count_nonzero(filled))
            if n_filled > 1.1 * cand.area and n_filled <= max_px:
                out.append(_Candidate(sl[0].start, sl[1].start, filled, stab[r]))


def _intersection(a: _Candidate, b: _Candidate) -> int:
    r0, r1 = max(a.r0, b.r0), min(a.r1, b.r1)
    c0, c1 = max(a.c0, b.c0), min(a.c1, b.c1)
    if r0 >= r1 or c0 >= c1:
        return 0
    ma = a.mask[r0 - a.r0 : r1 - a.r0, c0 - a.c0 : c1 - a.c0]
    mb = b.mask[r0 - b.r0 : r1 - b.r0, c0 - b.c0 : c1 - b.c0]
    return int(np.count_nonzero(ma & mb))


def _dedupe(cands: list[_Candidate], iou: float) -> list[_Candidate]:
    """Merge near-identical candidates (IoU >= ``iou``).

    The shape kept is the one with the best ``score * stability`` (a full-resolution Otsu
    region usually beats the half-resolution staircase of the same structure, its contour
    lying exactly on the edge); its stability becomes the best of its group: the same region
    found by several families or levels is the strongest evidence of persistence we have.
    """
    order = sorted(
        range(len(cands)),
        key=lambda i: (-cands[i].score * cands[i].stability, -cands[i].area, i),
    )
    box = np.array([(c.r0, c.r1, c.c0, c.c1, c.area) for c in cands], dtype=np.int64)
    kept: list[int] = []
    kept_box = np.zeros((len(cands), 5), dtype=np.int64)
    for i in order:
        bi = box[i]
        kb = kept_box[: len(kept)]
        # IoU >= iou needs overlapping boxes and the smaller area >= iou * the larger one.
        maybe = (
            (kb[:, 0] < bi[1]) & (bi[0] < kb[:, 1]) & (kb[:, 2] < bi[3]) & (bi[2] < kb[:, 3])
            & (np.minimum(kb[:, 4], bi[4]) >= iou * np.maximum(kb[:, 4], bi[4]))
        )
        dup = -1
        for j in np.flatnonzero(maybe):
            k = kept[j]
            inter = _intersection(cands[i], cands[k])
            if inter >= iou * (bi[4] + box[k, 4] - inter):
                dup = k
                break
        if dup < 0:
            kept_box[len(kept)] = bi
            kept.append(i)
        else:
            cands[dup].stability = max(cands[dup].stability, cands[i].stability)
    return [cands[k] for k in kept]


def _linear_weights(n_out: int, n_in: int, start: int, stop: int, lo: int, hi: int) -> np.ndarray:
    """Rows ``lo:hi`` of the linear-interpolation matrix from ``n_in`` to ``n_out`` samples,
    restricted to input columns ``start:stop`` (half-pixel centres, edges clamped: the
    convention of ``torch.nn.functional.interpolate(align_corners=False)``)."""
    x = (np.arange(lo, hi) + 0.5) * (n_in / n_out) - 0.5
    x = np.clip(x, 0, n_in - 1)
    i0 = np.floor(x).astype(np.intp)
    i1 = np.minimum(i0 + 1, n_in - 1)
    w1 = x - i0
    wmat = np.zeros((hi - lo, stop - start))
    rows = np.arange(hi - lo)
    for idx, wt in ((i0, 1 - w1), (i1, w1)):
        inside = (idx >= start) & (idx < stop)
        np.add.at(wmat, (rows[inside], idx[inside] - start), wt[inside])
    return wmat


def _upsample_into(out: np.ndarray, c: _Candidate, wshape: tuple[int, int]) -> None:
    """Bilinearly resample candidate ``c`` (working grid ``wshape``) onto ``out``'s grid, > 0.5.

    Works on the candidate's crop grown by one (empty) pixel, so the cost follows the ROI's
    size rather than the slice's; the result equals resampling the full mask (up to float
    rounding of values at exactly 0.5).
    """
    (h, w), (big_h, big_w) = wshape, out.shape
    r0, r1 = max(0, c.r0 - 1), min(h, c.r1 + 1)
    c0, c1 = max(0, c.c0 - 1), min(w, c.c1 + 1)
    crop = np.zeros((r1 - r0, c1 - c0))
    crop[c.r0 - r0 : c.r1 - r0, c.c0 - c0 : c.c1 - c0] = c.mask
    # Output pixels whose source position can reach the grown crop.
    o_r0, o_r1 = max(0, int(r0 * big_h / h) - 1), min(big_h, int(math.ceil(r1 * big_h / h)) + 1)
    o_c0, o_c1 = max(0, int(c0 * big_w / w) - 1), min(big_w, int(math.ceil(c1 * big_w / w)) + 1)
    wy = _linear_weights(big_h, h, r0, r1, o_r0, o_r1)
    wx = _linear_weights(big_w, w, c0, c1, o_c0, o_c1)
    out[o_r0:o_r1, o_c0:o_c1] = (wy @ crop @ wx.T) > 0.5


def _contour_score(c: _Candidate, edge: np.ndarray, edge_abs: np.ndarray) -> float:
    """How clearly a region is delineated by image edges, in [0, 1].

    Every inner-contour pixel looks up its edge strength ``e`` (see :func:`_edge_strength`)
    as the support ``1 - exp(-e^2)`` in [0, 1]. The score is the mean support over the
    contour times ``exp(-(e_core / CORE_EDGE_REF)^2)``, ``e_core`` the median absolute edge
    strength (``edge_abs``, no local normalisation) over the region's core (the pixels at
    least half the maximum depth from the contour), which only a strong edge running through
    the core, not texture or noise, pulls down:

    * a region bounded by edges all round, with a homogeneous interior, scores near 1;
    * one that leaks through a gap in an edge, or a fragment of a homogeneous structure,
      scores about the fraction of its contour that has an edge;
    * a partial-volume ring or strip lying along an edge (graph segmentation and Otsu bands
      produce them around every bright structure) has its core on that edge and scores ~0.

    Contour pixels on the image border are left out: the border is no evidence either way.
    """
    m = np.pad(c.mask, 1)
    depth = ndi.distance_transform_cdt(m, metric="taxicab")
    h, w = edge.shape
    rr, cc = np.nonzero(depth == 1)
    rr, cc = rr + (c.r0 - 1), cc + (c.c0 - 1)
    inside = (rr > 0) & (rr < h - 1) & (cc > 0) & (cc < w - 1)
    if not inside.any():
        return 0.0
    contour = float((1.0 - np.exp(-(edge[rr[inside], cc[inside]] ** 2))).mean())
    rr, cc = np.nonzero(depth >= max(1.0, 0.5 * float(depth.max())))
    core_e = float(np.median(edge_abs[rr + (c.r0 - 1), cc + (c.c0 - 1)]))
    return contour * math.exp(-((core_e / CORE_EDGE_REF) ** 2))


def _edge_strength(
    img: np.ndarray, ref: float, rel_ref: float, floor: float
) -> tuple[np.ndarray, np.ndarray]:
    """Edge strength of every pixel: ``max(g / ref, g / (rel_ref * local))``.

    ``g`` is the gradient magnitude (Gaussian sigma 1 px) of the normalised slice; intensities
    are in units of the slice's robust range, so ``g / ref`` is the same relative contrast in
    every modality. That alone misses soft-tissue edges in CT, whose robust range spans air
    to bone, so an edge also counts when it stands out from its surroundings: ``local`` is
    the mean gradient in a Gaussian window of sigma 8 px, with gradients clipped at twice the
    slice's median gradient so that edges do not raise their own reference, floored at
    ``floor``. The result is max-filtered over 3x3 so that a contour
    drawn one pixel off an edge (proposals made at half resolution) still finds it.

    Returns:
        ``(strength, absolute)``: the combined, max-filtered strength and the plain ``g / ref``.
    """
    g = ndi.gaussian_gradient_magnitude(img, sigma=1.0, mode="nearest")
    body = (img > 0.01) & (img < 0.99)
    typical = float(np.median(g[body])) if body.sum() >= 16 else floor
    # Clip the edges themselves out of the local reference so that it measures texture and
    # noise, not the edge under test.
    clipped = np.minimum(g, 2.0 * max(typical, floor))
    local = np.maximum(ndi.gaussian_filter(clipped, sigma=8.0, mode="nearest"), floor)
    strength = np.maximum(g / ref, g / (rel_ref * local))
    return ndi.maximum_filter(strength, size=3), g / ref


# --------------------------------------------------------------------------- public


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
            pixel counts ``1 - 1/e`` towards ``scores`` (see :func:`_edge_strength`).
        edge_rel_ref: ratio of the gradient to its local mean at which a contour pixel
            counts ``1 - 1/e`` (whichever of the two criteria is stronger applies).

    Returns:
        :class:`RoiProposals` on the input grid ``(H, W)``, sorted by descending score:
        ``scores`` = how clearly edges delineate the region (:func:`_contour_score`),
        ``stability`` = best-IoU persistence across neighbouring levels; both in [0, 1].
        Hole-filled variants of ring-shaped regions inherit the ring's stability.
    """
    from skimage.filters import gaussian

    arr = _as_slice(image)
    shape = arr.shape
    norm = normalize(arr)
    scale = min(1.0, work_size / max(shape))
    wshape = (max(8, round(shape[0] * scale)), max(8, round(shape[1] * scale)))
    work = _resize(norm, wshape)
    smooth = gaussian(work, sigma=smooth_sigma, preserve_range=True).astype(np.float32)
    # Half-equalised copy for graph segmentation, superpixels and edge scores: it stretches
    # the intensity ranges that most pixels occupy (soft tissue in CT, whose robust range
    # spans air to bone) while keeping part of the original contrast. Otsu bands use the
    # plain image: equalising would flatten the histogram valleys they look for.
    eq = (0.5 * work + 0.5 * _equalize(work)).astype(np.float32)
    eq_smooth = gaussian(eq, sigma=smooth_sigma, preserve_range=True).astype(np.float32)

    n_px = wshape[0] * wshape[1]
    min_px = max(4, int(math.ceil(min_region_frac * n_px)))
    max_px = int(max_region_frac * n_px)

    cands: list[_Candidate] = []
    if felzenszwalb_scales:
        levels = _felzenszwalb_levels(eq, tuple(felzenszwalb_scales), min_px)
        _collect(levels, _sequence_stability(levels), min_px, max_px, cands)
    if watershed_markers > 0 and merge_levels:
        levels = _watershed_levels(eq_smooth, watershed_markers, tuple(merge_levels))
        _collect(levels, _sequence_stability(levels), min_px, max_px, cands)
    for base, shifted in _threshold_levels(smooth, tuple(otsu_classes), threshold_delta):
        # Both shifts must leave the region intact, as in SAM's stability (IoU of the mask
        # at the lower and at the higher threshold): the worse of the two counts.
        stab = np.minimum(*(_best_iou(base, s)[0] for s in shifted))
        _collect([base], [stab], min_px, max_px, cands)

    if not cands:
        return RoiProposals.empty(shape)
    edge, edge_abs = _edge_strength(eq, edge_ref, edge_rel_ref, EDGE_FLOOR)
    for c in cands:
        c.score = _contour_score(c, edge, edge_abs)
    cands = _dedupe(cands, dedupe_iou)
    cands.sort(key=lambda c: (-c.score, -c.stability, -c.area))

    masks = np.zeros((len(cands), *shape), dtype=bool)
    for k, c in enumerate(cands):
        if wshape == shape:
            masks[k, c.r0 : c.r1, c.c0 : c.c1] = c.mask
        else:
            _upsample_into(masks[k], c, wshape)
    out = torch.from_numpy(masks)
    scores = torch.tensor([c.score for c in cands], dtype=torch.float32).clamp(0, 1)
    stab = torch.tensor([c.stability for c in cands], dtype=torch.float32).clamp(0, 1)
    return RoiProposals(out, scores, stab)


def _check_options(func, options: dict, what: str) -> None:
    import inspect

    allowed = [
        n for n, p in inspect.signature(func).parameters.items() if p.kind is p.KEYWORD_ONLY
    ]
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise FmregError(f"unknown {what} option(s) {unknown}: use {allowed}")


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
        _check_options(propose_regions, options, "classical segmenter")
        self.options = options

    def segment(self, image: Tensor) -> RoiProposals:
        """Args: image: ``(H, W)`` slice. Returns its candidate ROIs (:func:`propose_regions`)."""
        return propose_regions(image, **self.options)


# --------------------------------------------------------------------------- encoder

# Intensity is one-dimensional, so any centred intensity channel can only say "brighter" or
# "darker than the slice mean": every bright ROI would point the same way. Intensities (of
# the pixel and of its surroundings) therefore enter as soft histograms, a non-linear
# embedding in which different intensity levels are near-orthogonal. Each group's weight is
# roughly its share of the cosine similarity (histogram prototypes have norms of 0.3-1, the
# standardised groups RMS ~1 per pixel before weighting). Chosen by matching accuracy on the
# synthetic shapes of the tests and the 2D example pairs.
HIST_BINS = 10
HIST_WEIGHT = 1.0
# Local means at these sigmas (px), each as a soft histogram of CONTEXT_BINS bins: what
# surrounds a region (its neighbours' intensities), at two ranges.
CONTEXT_SIGMAS = (4.0, 12.0)
CONTEXT_BINS = 6
CONTEXT_WEIGHT = 0.7
GRADIENT_SIGMAS = (1.0, 2.0)
GRADIENT_WEIGHT = 0.3
LOCAL_STD_SIGMA = 2.0
LOCAL_STD_WEIGHT = 0.3
MIND_DILATION = 2
MIND_SIGMA = 1.0
MIND_WEIGHT = 0.4
# Coarse position (row, column in [-1, 1]): on the example pairs, intra- and inter-subject,
# it raised the share of correct pairs among the 5 most similar, because left/right twins
# (lungs, kidneys, buttocks) look alike otherwise. Set 0 for images whose anatomy is not
# roughly aligned.
POSITION_WEIGHT = 1.0


def _gaussian_kernel(sigma: float, dtype: torch.dtype) -> Tensor:
    radius = max(1, int(math.ceil(3.0 * sigma)))
    x = torch.arange(-radius, radius + 1, dtype=dtype)
    k = torch.exp(-0.5 * (x / sigma) ** 2)
    return k / k.sum()


def gaussian_blur(x: Tensor, sigma: float) -> Tensor:
    """Separable Gaussian blur of ``(N, C, H, W)`` maps, edges replicated; sigma in pixels."""
    if sigma <= 0:
        return x
    k = _gaussian_kernel(sigma, x.dtype)
    r = k.numel() // 2
    n, c, h, w = x.shape
    y = x.reshape(n * c, 1, h, w)
    y = F.conv2d(F.pad(y, (r, r, 0, 0), mode="replicate"), k.view(1, 1, 1, -1))
    y = F.conv2d(F.pad(y, (0, 0, r, r), mode="replicate"), k.view(1, 1, -1, 1))
    return y.reshape(n, c, h, w)


def _gradient_magnitude(x: Tensor) -> Tensor:
    """Central-difference gradient magnitude of ``(N, 1, H, W)``, per pixel."""
    p = F.pad(x, (1, 1, 1, 1), mode="replicate")
    gy = 0.5 * (p[:, :, 2:, 1:-1] - p[:, :, :-2, 1:-1])
    gx = 0.5 * (p[:, :, 1:-1, 2:] - p[:, :, 1:-1, :-2])
    return torch.sqrt(gy * gy + gx * gx)


def mind_ssc(x: Tensor, dilation: int = MIND_DILATION, sigma: float = MIND_SIGMA) -> Tensor:
    """2D MIND self-similarity context descriptor (Heinrich et al., MICCAI 2013), 6 channels.

    The 3D descriptor compares patches around the pairs of the 6-neighbourhood; its 2D variant
    here uses the 4-neighbourhood at distance ``dilation`` (up, right, down, left) and all 6
    of its pairs: the 4 diagonal pairs (distance sqrt(2) * dilation) and the 2 opposite ones.
    Patch distances are Gaussian-weighted (``sigma`` px) squared differences.

    Args:
        x: ``(N, 1, H, W)`` image.

    Returns:
        ``(N, 6, H, W)`` in (0, 1], the largest channel of every pixel equal to 1.
    """
    d = int(dilation)
    h, w = x.shape[-2:]
    xp = F.pad(x, (d, d, d, d), mode="replicate")
    nbr = [(-d, 0), (0, d), (d, 0), (0, -d)]

    def shifted(off: tuple[int, int]) -> Tensor:
        return xp[:, :, d + off[0] : d + off[0] + h, d + off[1] : d + off[1] + w]

    pairs = [(0, 1), (1, 2), (2, 3), (3, 0), (0, 2), (1, 3)]
    dist = torch.cat([(shifted(nbr[a]) - shifted(nbr[b])) ** 2 for a, b in pairs], dim=1)
    dist = gaussian_blur(dist, sigma)
    var = dist.mean(dim=1, keepdim=True)
    # Bound the local variance as MIND does, so flat regions do not divide by ~0.
    vm = var.mean()
    var = var.clamp(min=float(vm) * 1e-3 + 1e-12, max=float(vm) * 1e3 + 1e-12)
    mind = torch.exp(-dist / var)
    return mind / mind.amax(dim=1, keepdim=True)


def _standardise(ch: Tensor) -> Tensor:
    """Centre each channel of ``(C, H, W)`` on its slice mean, scale it to unit std, and
    squash it softly into (-2, 2) with ``2 tanh(z / 2)``.

    Centring is what makes cosine similarity of masked means discriminative: a region darker
    than the slice average points the opposite way from a brighter one instead of both
    pointing into the positive orthant. Squashing keeps a small, extreme region (z of 5 or
    more) from turning its prototype into that one channel, and keeps the centred groups
    from outweighing the intensity histogram, whose prototypes have norms of at most 1.
    """
    mean = ch.mean(dim=(1, 2), keepdim=True)
    std = ch.std(dim=(1, 2), keepdim=True)
    z = torch.where(std > 1e-6, (ch - mean) / std.clamp_min(1e-6), torch.zeros_like(ch))
    return 2.0 * torch.tanh(0.5 * z)


def soft_histogram(x: Tensor, bins: int, width: float = 0.75) -> Tensor:
    """Soft membership of ``(N, 1, H, W)`` values in [0, 1] to ``bins`` evenly spaced bins.

    Gaussian bumps centred at ``linspace(0, 1, bins)`` with sigma ``width`` times the bin
    spacing, normalised to sum to 1 per pixel. Returns ``(N, bins, H, W)``; the mean over a
    region is its (smoothed) intensity histogram.
    """
    centres = torch.linspace(0.0, 1.0, bins, dtype=x.dtype).view(1, -1, 1, 1)
    sigma = width / (bins - 1)
    bumps = torch.exp(-0.5 * ((x - centres) / sigma) ** 2)
    return bumps / bumps.sum(dim=1, keepdim=True).clamp_min(1e-30)


def classical_features(
    image: Tensor | np.ndarray,
    *,
    stride: int = 1,
    hist_bins: int = HIST_BINS,
    position_weight: float = POSITION_WEIGHT,
) -> Tensor:
    """Handcrafted dense features for ROI prototypes (stand-in for SAM's image encoder).

    Channels, in order (all computed on the slice normalised to [0, 1] by its 1st/99th
    percentiles):

    1. intensity: ``hist_bins`` soft-histogram memberships (:func:`soft_histogram`) of the
       sigma-1 smoothed intensity. A prototype's part here is the ROI's intensity histogram:
       non-negative, and orthogonal between ROIs with disjoint intensity ranges.
    2. context: for each sigma of ``CONTEXT_SIGMAS`` px, ``CONTEXT_BINS`` soft-histogram
       memberships of the Gaussian local mean: the intensities around the ROI.
    3. gradient magnitude at sigmas ``GRADIENT_SIGMAS`` px (edges, texture).
    4. local standard deviation in a Gaussian window of sigma ``LOCAL_STD_SIGMA`` px.
    5. 6 MIND-SSC channels (:func:`mind_ssc`): local self-similarity structure.
    6. 2 coarse position channels (row, column in [-1, 1], centred on the slice) times
       ``position_weight / sqrt(2)``; ``position_weight=0`` leaves them out (position-free).

    Groups 3-5 are centred on the slice mean, scaled and squashed per channel
    (:func:`_standardise`) so that they tell "more/less textured than this slice's average"
    in either direction. Every group except position is divided by the square root of its
    channel count and multiplied by its weight (``*_WEIGHT``), so no group dominates the
    cosine by having many channels.

    Args:
        image: ``(H, W)`` slice, any intensity range.
        stride: the feature grid is ``(ceil(H / stride), ceil(W / stride))`` (area-averaged),
            covering the same field of view.
        hist_bins: number of intensity-histogram channels (>= 2).
        position_weight: weight of the position channels (``POSITION_WEIGHT``); 0 leaves
            them out.

    Returns:
        ``(C, H', W')`` float32 with ``C = hist_bins + 2 * CONTEXT_BINS + 9`` plus 2 position
        channels when ``position_weight > 0`` (33 by default).
    """
    arr = _as_slice(image)
    if stride < 1:
        raise FmregError(f"feature stride must be >= 1, got {stride}")
    if hist_bins < 2:
        raise FmregError(f"hist_bins must be >= 2, got {hist_bins}")
    x = torch.from_numpy(normalize(arr))[None, None]
    h, w = arr.shape

    def scaled(ch: Tensor, weight: float) -> Tensor:
        return ch[0] * (weight / math.sqrt(ch.shape[1]))

    def standardised(ch: Tensor, weight: float) -> Tensor:
        return _standardise(ch[0]) * (weight / math.sqrt(ch.shape[1]))

    parts = [scaled(soft_histogram(gaussian_blur(x, 1.0), hist_bins), HIST_WEIGHT)]
    context_weight = CONTEXT_WEIGHT / math.sqrt(len(CONTEXT_SIGMAS))
    for sigma in CONTEXT_SIGMAS:
        parts.append(scaled(soft_histogram(gaussian_blur(x, sigma), CONTEXT_BINS), context_weight))
    grads = torch.cat([_gradient_magnitude(gaussian_blur(x, s)) for s in GRADIENT_SIGMAS], dim=1)
    mean2 = gaussian_blur(x, LOCAL_STD_SIGMA)
    local_std = torch.sqrt((gaussian_blur(x * x, LOCAL_STD_SIGMA) - mean2 * mean2).clamp_min(0))
    parts += [
        standardised(grads, GRADIENT_WEIGHT),
        standardised(local_std, LOCAL_STD_WEIGHT),
        standardised(mind_ssc(x), MIND_WEIGHT),
    ]
    if position_weight > 0:
        rows = torch.linspace(-1.0, 1.0, h).view(h, 1).expand(h, w)
        cols = torch.linspace(-1.0, 1.0, w).view(1, w).expand(h, w)
        parts.append(torch.stack([rows, cols]) * (position_weight / math.sqrt(2.0)))
    feats = torch.cat(parts, dim=0)
    if stride > 1:
        size = (math.ceil(h / stride), math.ceil(w / stride))
        feats = F.interpolate(feats[None], size=size, mode="area")[0]
    return feats.float().contiguous()


class ClassicalEncoder:
    """Encoder ``"classical"``: :func:`classical_features` with fixed keyword options.

    Args:
        **options: keyword arguments of :func:`classical_features` (``stride``,
            ``hist_bins``, ``position_weight``).
    """

    name = "classical"

    def __init__(self, **options) -> None:
        _check_options(classical_features, options, "classical encoder")
        self.options = options

    def features(self, image: Tensor) -> Tensor:
        """Args: image: ``(H, W)`` slice. Returns ``(C, H', W')`` float32 features."""
        return classical_features(image, **self.options)
