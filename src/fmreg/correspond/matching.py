"""ROI matching by prototype similarity (paper 002, Eq. 6-9, Tables 3 and 6).

Moving ROIs index the rows and fixed ROIs the columns of every similarity matrix here.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch.nn.functional as F
from torch import Tensor

from fmreg.errors import FmregError

__all__ = [
    "MATCH_MODES",
    "SIMILARITY_MAPPINGS",
    "SIMILARITY_THRESHOLD",
    "Match",
    "match_rois",
    "similarity_matrix",
]

# Paper 002, Sec. 4.2: similarity threshold epsilon = 0.8 (best in its Table 4).
SIMILARITY_THRESHOLD = 0.8
SIMILARITY_MAPPINGS = ("clamp", "affine", "abs")
MATCH_MODES = ("greedy", "optimal", "one_to_many")


@dataclass(frozen=True)
class Match:
    """One ROI correspondence: row ``moving_index`` of S paired with column ``fixed_index``."""

    moving_index: int
    fixed_index: int
    similarity: float


def similarity_matrix(p_moving: Tensor, p_fixed: Tensor, *, mapping: str = "clamp") -> Tensor:
    """Cosine similarity of prototypes, mapped to [0, 1] (Eq. 6).

    The paper writes ``S = ||cos||`` and states ``S in [0, 1]`` without saying how negative
    cosines are mapped. ``mapping`` chooses:

    * ``"clamp"`` (default): ``max(cos, 0)``. Equals the cosine wherever it is positive, so
      the paper's threshold epsilon = 0.8 keeps its meaning (cosine > 0.8), and
      anti-correlated prototypes (e.g. a dark vs a bright ROI under centred features) count
      as dissimilar.
    * ``"affine"``: ``(cos + 1) / 2``; order-preserving over the whole range, but 0.8 then
      means cosine > 0.6.
    * ``"abs"``: ``|cos|``, the literal reading of the norm bars; treats anti-correlated
      prototypes as similar, which suits only non-negative features.

    A zero prototype has cosine 0 with everything.

    Args:
        p_moving: ``(Kx, C)`` moving-image prototypes.
        p_fixed: ``(Ky, C)`` fixed-image prototypes.
        mapping: one of ``SIMILARITY_MAPPINGS``.

    Returns:
        ``(Kx, Ky)`` float32 in [0, 1].
    """
    if p_moving.ndim != 2 or p_fixed.ndim != 2 or p_moving.shape[1] != p_fixed.shape[1]:
        raise FmregError(
            f"prototypes must be (Kx, C) and (Ky, C) with the same C, got "
            f"{tuple(p_moving.shape)} and {tuple(p_fixed.shape)}"
        )
    if mapping not in SIMILARITY_MAPPINGS:
        raise FmregError(
            f"unknown similarity mapping {mapping!r}: use one of {SIMILARITY_MAPPINGS}"
        )
    a = F.normalize(p_moving.double(), dim=1, eps=1e-12)
    b = F.normalize(p_fixed.double(), dim=1, eps=1e-12)
    cos = (a @ b.T).clamp(-1.0, 1.0)
    if mapping == "clamp":
        s = cos.clamp_min(0.0)
    elif mapping == "affine":
        s = (cos + 1.0) / 2.0
    else:
        s = cos.abs()
    return s.float()


def _sorted(matches: list[Match]) -> list[Match]:
    # Most similar first; ties by (moving, fixed) index so results never depend on set order.
    return sorted(matches, key=lambda m: (-m.similarity, m.moving_index, m.fixed_index))


def match_rois(
    similarity: Tensor,
    *,
    threshold: float = SIMILARITY_THRESHOLD,
    mode: str = "greedy",
    top_k: int | None = None,
) -> list[Match]:
    """Pair moving ROIs (rows) with fixed ROIs (columns) of a similarity matrix (Eq. 7-9).

    Only pairs with ``S > threshold`` (strictly, as in Eq. 7) can be matched.

    * ``"greedy"``: the paper's rule: take the global maximum, remove its row and column,
      repeat while the maximum exceeds the threshold. One-to-one.
    * ``"optimal"``: one-to-one assignment maximising the total similarity of the matched
      pairs (Hungarian algorithm, ``scipy.optimize.linear_sum_assignment``), where pairs at or
      below the threshold are worth nothing, so they never displace a valid pair; the
      assignment's pairs at or below the threshold are then dropped.
    * ``"one_to_many"``: every moving ROI paired with its most similar fixed ROI and every
      fixed ROI with its most similar moving ROI (the union, each pair once), if above the
      threshold: an ROI may take part in several pairs (paper Table 6, "one-to-many").

    Ties are broken deterministically: ``"greedy"`` and ``"one_to_many"`` prefer the lower
    (moving, fixed) index; ``"optimal"`` takes the solver's (deterministic) choice among
    assignments of equal total similarity.

    Args:
        similarity: ``(Kx, Ky)`` matrix from :func:`similarity_matrix`.
        threshold: similarity a pair must exceed (paper: 0.8).
        mode: one of ``MATCH_MODES``.
        top_k: keep only the ``top_k`` most similar pairs (paper Table 3); ``None`` keeps all.

    Returns:
        Matches sorted by descending similarity (ties by moving, then fixed index).
    """
    if similarity.ndim != 2:
        raise FmregError(
            f"similarity must be a (Kx, Ky) matrix, got shape {tuple(similarity.shape)}"
        )
    if mode not in MATCH_MODES:
        raise FmregError(f"unknown matching mode {mode!r}: use one of {MATCH_MODES}")
    if top_k is not None and top_k < 0:
        raise FmregError(f"top_k must be >= 0 or None, got {top_k}")
    s = similarity.detach().cpu().numpy()
    if not np.issubdtype(s.dtype, np.floating):
        s = s.astype(np.float64)
    if not np.isfinite(s).all():
        raise FmregError("similarity matrix contains NaN/Inf")
    # Compare in the matrix's own precision: a float32 S(i, j) computed as 0.8 must not
    # count as "> 0.8" because float32(0.8) is a hair above the float64 0.8.
    thr = s.dtype.type(threshold)
    kx, ky = s.shape
    matches: list[Match] = []
    if kx and ky:
        if mode == "greedy":
            matches = _greedy(s, thr)
        elif mode == "optimal":
            matches = _optimal(s, thr)
        else:
            matches = _one_to_many(s, thr)
    matches = _sorted(matches)
    return matches if top_k is None else matches[:top_k]


def _greedy(s: np.ndarray, threshold: float) -> list[Match]:
    work = s.copy()
    out = []
    for _ in range(min(work.shape)):
        # argmax returns the first maximum in row-major order: lowest (row, column) on ties.
        flat = int(np.argmax(work))
        i, j = divmod(flat, work.shape[1])
        if not work[i, j] > threshold:
            break
        out.append(Match(i, j, float(s[i, j])))
        work[i, :] = -np.inf
        work[:, j] = -np.inf
    return out


def _optimal(s: np.ndarray, threshold: float) -> list[Match]:
    from scipy.optimize import linear_sum_assignment

    gain = np.where(s > threshold, s, 0.0).astype(np.float64)
    rows, cols = linear_sum_assignment(gain, maximize=True)
    return [
        Match(int(i), int(j), float(s[i, j])) for i, j in zip(rows, cols) if s[i, j] > threshold
    ]


def _one_to_many(s: np.ndarray, threshold: float) -> list[Match]:
    pairs = set()
    best_fixed = np.argmax(s, axis=1)  # first maximum: lowest fixed index on ties
    best_moving = np.argmax(s, axis=0)
    for i, j in enumerate(best_fixed):
        if s[i, j] > threshold:
            pairs.add((i, int(j)))
    for j, i in enumerate(best_moving):
        if s[i, j] > threshold:
            pairs.add((int(i), j))
    return [Match(i, j, float(s[i, j])) for i, j in pairs]
