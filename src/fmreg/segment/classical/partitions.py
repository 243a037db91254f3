"""Partitions of a slice at neighbouring scales, and how persistent their regions are.

Each proposal family yields a sequence of partitions (integer label maps ``0..n-1`` of the
working slice, array order (H, W)), ordered from fine to coarse so that every region has
neighbouring levels to be compared with:

* graph-based segmentation (Felzenszwalb-Huttenlocher) at several scales;
* watershed superpixels merged at several intensity-difference levels;
* multi-Otsu bands split into connected components, each band map also computed with all
  thresholds shifted by -delta and by +delta.

A region's stability (SAM: IoU of the mask at two logit thresholds) is its best IoU with a
region of a neighbouring level.
"""

from __future__ import annotations

import numpy as np
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from fmreg.segment.classical.common import resize_area

__all__ = [
    "best_iou",
    "felzenszwalb_levels",
    "sequence_stability",
    "threshold_levels",
    "watershed_levels",
]


def _upsample_labels(labels: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour upsampling of a label map (pixel centres map to pixel centres)."""
    h, w = labels.shape
    rows = np.minimum(((np.arange(shape[0]) + 0.5) * h / shape[0]).astype(np.intp), h - 1)
    cols = np.minimum(((np.arange(shape[1]) + 0.5) * w / shape[1]).astype(np.intp), w - 1)
    return labels[rows[:, None], cols[None, :]]


def felzenszwalb_levels(
    work: np.ndarray, scales: tuple[float, ...], min_px: int
) -> list[np.ndarray]:
    """Graph-based segmentations of ``work`` at each of ``scales``, fine to coarse.

    Args:
        work: ``(H, W)`` float32 working slice in [0, 1].
        scales: Felzenszwalb ``scale`` values (larger: coarser).
        min_px: smallest region of interest in working pixels; segments are made at half
            resolution with a quarter of it as the minimum component size.

    Returns:
        One ``(H, W)`` label map per scale.
    """
    from skimage.segmentation import felzenszwalb

    # Graph segmentation is the slowest step; at half resolution it is ~6x faster and the
    # regions we want (organs, cavities) are far larger than the 2-pixel staircase it causes.
    half_shape = (max(8, work.shape[0] // 2), max(8, work.shape[1] // 2))
    half = resize_area(work, half_shape)
    min_size = max(4, min_px // 4)
    return [
        _upsample_labels(felzenszwalb(half, scale=s, sigma=0.8, min_size=min_size), work.shape)
        for s in scales
    ]


def watershed_levels(
    smooth: np.ndarray, n_markers: int, levels: tuple[float, ...]
) -> list[np.ndarray]:
    """Compact-watershed superpixels of ``smooth`` merged at each intensity level.

    Args:
        smooth: ``(H, W)`` float32 smoothed working slice in [0, 1].
        n_markers: number of superpixels.
        levels: mean-intensity differences (normalised units) below which neighbouring
            superpixels merge, fine to coarse.

    Returns:
        One ``(H, W)`` label map per level.
    """
    from skimage.filters import sobel
    from skimage.segmentation import watershed

    # Superpixels only seed the merging, so half resolution is plenty (and ~4x faster).
    half = resize_area(smooth, (max(8, smooth.shape[0] // 2), max(8, smooth.shape[1] // 2)))
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


def threshold_levels(
    smooth: np.ndarray, classes: tuple[int, ...], delta: float
) -> list[tuple[np.ndarray, list[np.ndarray]]]:
    """Per class count: the partition at the multi-Otsu thresholds t and those at t -+ delta.

    Args:
        smooth: ``(H, W)`` float32 smoothed working slice in [0, 1].
        classes: multi-Otsu class counts; a count the histogram cannot support is skipped.
        delta: threshold shift in normalised intensity.

    Returns:
        Per class count, ``(base, [at t - delta, at t + delta])``: ``(H, W)`` label maps of
        the bands' connected components.
    """
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


def best_iou(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
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


def sequence_stability(levels: list[np.ndarray]) -> list[np.ndarray]:
    """Best IoU of each region with any region of a neighbouring level (previous or next).

    The better neighbour counts: a structure that survives one scale step (say it merges
    with its surroundings only at the next coarser scale) is persistent, as a SAM mask that
    barely changes under a small threshold shift is.
    """
    best = [np.zeros(int(lv.max()) + 1) for lv in levels]
    for i in range(len(levels) - 1):
        fwd, bwd = best_iou(levels[i], levels[i + 1])
        np.maximum(best[i], fwd, out=best[i])
        np.maximum(best[i + 1], bwd, out=best[i + 1])
    return best

