"""Candidate regions of the classical segmenter: collected, scored, merged, resampled.

A candidate is a bool crop of the working slice (array order (H, W), sizes in pixels). Its
``stability`` comes from :mod:`~fmreg.segment.classical.partitions`; its ``score`` (SAM:
predicted IoU) says how clearly image edges delineate it (:func:`contour_score`).
"""

from __future__ import annotations

import math

import numpy as np
from scipy import ndimage as ndi

__all__ = [
    "CORE_EDGE_REF",
    "EDGE_FLOOR",
    "EDGE_REF",
    "EDGE_REL_REF",
    "Candidate",
    "collect",
    "contour_score",
    "dedupe",
    "edge_strength",
    "upsample_into",
]

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


class Candidate:
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


def collect(
    levels: list[np.ndarray],
    stability: list[np.ndarray],
    min_px: int,
    max_px: int,
    out: list[Candidate],
    min_solid: float = 0.6,
) -> None:
    """Append every region of the partitions whose area lies in ``[min_px, max_px]``.

    Args:
        levels: ``(H, W)`` label maps ``0..n-1`` of the working slice.
        stability: per level, ``(n,)`` stability of each of its regions.
        min_px, max_px: area bounds in working pixels; ``min_px`` is also the largest hole
            filled in place.
        out: receives the candidates (a region with large holes gives a second candidate
            with them filled).
        min_solid: a region losing more than ``1 - min_solid`` of its area to the opening
            that removes thin strips is dropped.
    """
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
            cand = Candidate(sl[0].start, sl[1].start, mask, stab[r])
            out.append(cand)
            n_filled = int(np.count_nonzero(filled))
            if n_filled > 1.1 * cand.area and n_filled <= max_px:
                out.append(Candidate(sl[0].start, sl[1].start, filled, stab[r]))


def _intersection(a: Candidate, b: Candidate) -> int:
    r0, r1 = max(a.r0, b.r0), min(a.r1, b.r1)
    c0, c1 = max(a.c0, b.c0), min(a.c1, b.c1)
    if r0 >= r1 or c0 >= c1:
        return 0
    ma = a.mask[r0 - a.r0 : r1 - a.r0, c0 - a.c0 : c1 - a.c0]
    mb = b.mask[r0 - b.r0 : r1 - b.r0, c0 - b.c0 : c1 - b.c0]
    return int(np.count_nonzero(ma & mb))


def dedupe(cands: list[Candidate], iou: float) -> list[Candidate]:
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


def upsample_into(out: np.ndarray, c: Candidate, wshape: tuple[int, int]) -> None:
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


def contour_score(c: Candidate, edge: np.ndarray, edge_abs: np.ndarray) -> float:
    """How clearly a region is delineated by image edges, in [0, 1].

    Every inner-contour pixel looks up its edge strength ``e`` (see :func:`edge_strength`)
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


def edge_strength(
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

