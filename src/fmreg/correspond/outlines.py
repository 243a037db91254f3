"""The ROI consensus refined on the regions' outlines: trimmed iterative closest points.

The consensus (:mod:`fmreg.correspond.consensus`) weighs moments: centroids and ellipses. Two
segmentations that cut one structure differently move its centroid with the cut, so a similarity
fitted to moments is off by a fraction of the cut (1–4 px on the known-similarity pairs). Their
outlines, though, still share the part that follows the structure's own edges. So the agreeing
pairs' outline pixels are matched to their nearest partner outline under the current
similarity, matches further than :data:`TRIM` times the median distance are dropped (the parts
the cuts made), a least-squares similarity is fitted to the rest, and this repeats. Each region
weighs the same whatever its length of outline.

Coordinates as in the consensus: in-plane mm from each slice's first pixel, ``(x, y)`` =
(column, row) order.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
from scipy.spatial import cKDTree
from torch import Tensor

from fmreg.correspond.consensus import fit_similarity

__all__ = ["ITERATIONS", "TRIM", "outline_mask", "outline_points", "refine_on_outlines"]

#: Most rounds of matching and fitting.
ITERATIONS = 30
#: Matches further than this many times the round's median distance are dropped.
TRIM = 2.0
#: A region with fewer outline pixels than this takes no part.
MIN_POINTS = 3
#: Most fixed outline points matched in a round (more are thinned evenly).
MAX_POINTS = 20_000


def outline_mask(mask: np.ndarray) -> np.ndarray:
    """The pixels of a ``(H, W)`` bool mask that touch its outside (4-connected; the array's
    border counts as outside), as a bool mask of the same shape."""
    box = np.pad(mask, 1)
    interior = box[:-2, 1:-1] & box[2:, 1:-1] & box[1:-1, :-2] & box[1:-1, 2:]
    return mask & ~interior


def outline_points(mask: Tensor, spacing_rc: Sequence[float]) -> np.ndarray:
    """``(N, 2)`` float64 in-plane positions (mm, ``(x, y)``) of the pixels of a ``(H, W)`` mask
    that touch its outside (4-connected; the image border counts as outside)."""
    m = mask.numpy().astype(bool)
    rows, cols = np.flatnonzero(m.any(axis=1)), np.flatnonzero(m.any(axis=0))
    if len(rows) == 0:
        return np.zeros((0, 2))
    # Within the region's bounding box: regions are small on big slices.
    r, c = np.nonzero(outline_mask(m[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]))
    return np.stack([(c + cols[0]) * spacing_rc[1], (r + rows[0]) * spacing_rc[0]], axis=1).astype(np.float64)


def refine_on_outlines(matrix: np.ndarray, fixed: Sequence[np.ndarray], moving: Sequence[np.ndarray],
                       floor_mm: float, iterations: int = ITERATIONS, trim: float = TRIM) -> np.ndarray:
    """The in-plane similarity ``matrix`` (fixed mm → moving mm) refined on region outlines.

    Args:
        matrix: ``(3, 3)`` start, e.g. the consensus.
        fixed, moving: Outline points (:func:`outline_points`) of the agreeing pairs, pair ``k``
            being ``(fixed[k], moving[k])``.
        floor_mm: The distance below which a match is never dropped (e.g. one moving pixel).
        iterations: Most rounds.
        trim: Drop matches further than this times the round's median distance.

    Returns:
        The refined ``(3, 3)`` matrix; ``matrix`` itself when fewer than two regions have outlines.
    """
    pairs = [(f, m) for f, m in zip(fixed, moving) if len(f) >= MIN_POINTS and len(m) >= MIN_POINTS]
    if len(pairs) < 2:
        return matrix
    # Every stride-th fixed point: a 3D stack's hundreds of regions need not all their pixels.
    stride = -(-sum(len(f) for f, _ in pairs) // MAX_POINTS)
    pairs = [(f[::stride], m) for f, m in pairs]
    src, dst = np.concatenate([f for f, _ in pairs]), np.concatenate([m for _, m in pairs])
    region = np.repeat(np.arange(len(pairs)), [len(f) for f, _ in pairs])
    weight = np.concatenate([np.full(len(f), 1.0 / len(f)) for f, _ in pairs])
    # One tree for every region: a third coordinate, the region's index times a distance no
    # in-plane offset reaches, keeps each point's nearest partner in its own region.
    apart = 10.0 * (np.ptp(np.concatenate([src, dst]), axis=0).max() + 1.0)
    tree = cKDTree(np.c_[dst, apart * np.repeat(np.arange(len(pairs)), [len(m) for _, m in pairs])])
    for _ in range(iterations):
        mapped = src @ matrix[:2, :2].T + matrix[:2, 2]
        _, idx = tree.query(np.c_[mapped, apart * region])
        dist = np.linalg.norm(dst[idx] - mapped, axis=1)
        close = dist <= max(trim * float(np.median(dist)), floor_mm)
        # A region with fewer than MIN_POINTS close matches has nothing to say this round.
        enough = np.bincount(region[close], minlength=len(pairs)) >= MIN_POINTS
        close &= enough[region]
        if np.count_nonzero(enough) < 2:
            break
        new = fit_similarity(src[close], dst[idx[close]], weight[close])
        done = np.abs(new - matrix).max() < 1e-4  # mm of shift, 1e-4 of scale and rotation
        matrix = new
        if done:
            break
    return matrix
