"""A global transform from ROI correspondences: the consensus of many matched regions.

Intensity terms see only what is near; a region matched by its prototype can be anywhere. So
before the dense fit, every ROI of the fixed image is paired with its ``top_k`` most similar
ROIs of the moving image (*candidates*, most of them wrong), and a RANSAC search finds the
in-plane similarity (rotation, isotropic scale, translation) that the most candidates agree
with. Agreement is the overlap of the two regions' moment ellipses under the hypothesis — the
Bhattacharyya coefficient of two Gaussians with the regions' centroids and covariances — so
position, size, elongation and orientation all count, and a large region that merely
contains the other does not. The identity competes as one more hypothesis: a pair that needs
no global move keeps none. A few distinct best hypotheses are each refined (least squares on
the agreeing centroids, then a local search on the score itself, since a region the two
segmentations cut differently moves its centroid but barely its overlap), and the best wins.

Coordinates are in-plane millimetres measured from each slice's first pixel, ``(column,
row)`` order (as the plausibility gates of :mod:`fmreg.correspond.pairs`), so a transform
found on slices of a 3D stack applies to every slice; :func:`to_physical` turns it into a
homogeneous map of physical points for the fit.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from torch import Tensor

from fmreg.core.grid import Grid
from fmreg.correspond.matching import similarity_matrix

__all__ = ["GlobalMatch", "RegionMoments", "agreement", "consensus_similarity", "fit_similarity", "region_moments",
           "to_physical"]


@dataclass
class RegionMoments:
    """First and second moments of ROIs in one image's slices.

    Attributes:
        centroids: ``(K, 2)`` float64 in-plane centroids, mm from the slice's first pixel, ``(x, y)``
            = (column, row) order.
        covariances: ``(K, 2, 2)`` float64 in-plane covariances, mm², same axis order.
        slices: ``(K,)`` int64 slice index of each ROI (0 for 2D).
        prototypes: ``(K, C)`` float ROI prototypes.
    """

    centroids: np.ndarray
    covariances: np.ndarray
    slices: np.ndarray
    prototypes: Tensor

    def __len__(self) -> int:
        return len(self.centroids)


def region_moments(masks: Sequence[Tensor], prototypes: Sequence[Tensor], spacing_rc: Sequence[float]) -> RegionMoments:
    """Moments of the ROIs of every slice.

    Args:
        masks: Per slice, ``(K_s, H, W)`` bool ROI masks.
        prototypes: Per slice, ``(K_s, C)`` prototypes.
        spacing_rc: In-plane spacing (mm) in array order (row, column).
    """
    cents, covs, slices, protos = [], [], [], []
    # A pixel is a square of side s, not a point: its own variance s²/12 keeps covariances of
    # thin regions invertible.
    pixel = np.diag([spacing_rc[1] ** 2, spacing_rc[0] ** 2]) / 12.0
    for s, (m, p) in enumerate(zip(masks, prototypes)):
        for mask in m:
            r, c = torch.nonzero(mask, as_tuple=True)
            pts = torch.stack([c * spacing_rc[1], r * spacing_rc[0]], dim=1).double().numpy()
            centre = pts.mean(axis=0)
            d = pts - centre
            cents.append(centre)
            covs.append(d.T @ d / max(len(d), 1) + pixel)
            slices.append(s)
        if len(m):
            protos.append(p)
    dim = protos[0].shape[1] if protos else 1
    return RegionMoments(
        np.asarray(cents, dtype=np.float64).reshape(-1, 2),
        np.asarray(covs, dtype=np.float64).reshape(-1, 2, 2),
        np.asarray(slices, dtype=np.int64),
        torch.cat(protos) if protos else torch.zeros(0, dim),
    )


@dataclass
class GlobalMatch:
    """The consensus transform and the candidates that agree with it.

    Attributes:
        matrix: ``(3, 3)`` homogeneous in-plane map, fixed mm → moving mm (see the module docstring).
        fixed_index, moving_index: ``(N,)`` ROI indices (into the two :class:`RegionMoments`) of
            the agreeing candidates, one per fixed ROI.
        agreement: ``(N,)`` their overlap coefficient under ``matrix``, in (0, 1].
        score: The hypothesis' score (sum of similarity × overlap over fixed ROIs).
        identity_score: The identity's score, for comparison.
    """

    matrix: np.ndarray
    fixed_index: np.ndarray
    moving_index: np.ndarray
    agreement: np.ndarray
    score: float
    identity_score: float

    @property
    def scale(self) -> float:
        return float(np.sqrt(abs(np.linalg.det(self.matrix[:2, :2]))))

    @property
    def angle_deg(self) -> float:
        return float(np.degrees(np.arctan2(self.matrix[1, 0], self.matrix[0, 0])))

    def summary(self) -> dict:
        """JSON-ready: scale, rotation, translation (mm), agreeing pairs, scores."""
        return {"scale": round(self.scale, 4), "angle_deg": round(self.angle_deg, 3),
                "shift_mm": [round(float(v), 3) for v in self.matrix[:2, 2]],
                "pairs": int(len(self.fixed_index)), "score": round(self.score, 4),
                "identity_score": round(self.identity_score, 4)}


#: Scale factors outside [1/x, x] are not anatomy (as the moments start's bound).
MAX_SCALE = 2.0


def _candidates(fixed: RegionMoments, moving: RegionMoments, top_k: int, slice_range: int) -> tuple[np.ndarray, ...]:
    """``(fixed index, moving index, similarity)`` arrays, grouped by fixed ROI: each fixed ROI's
    ``top_k`` most similar moving ROIs on the slices searched."""
    if not len(fixed) or not len(moving):
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0)
    sim = similarity_matrix(moving.prototypes, fixed.prototypes).numpy()  # (K_moving, K_fixed)
    near = np.abs(moving.slices[:, None] - fixed.slices[None, :]) <= slice_range
    sim = np.where(near, sim, 0.0)
    k = min(top_k, sim.shape[0])
    best = np.argsort(-sim, axis=0, kind="stable")[:k]  # (k, K_fixed)
    fj = np.repeat(np.arange(sim.shape[1]), k)
    mi = best.T.reshape(-1)
    s = sim[mi, fj]
    keep = s > 0
    return fj[keep], mi[keep], s[keep]


def _overlap(matrices: np.ndarray, cf: np.ndarray, covf: np.ndarray, cm: np.ndarray, covm: np.ndarray) -> np.ndarray:
    """Bhattacharyya coefficient ``(H, N)`` of the fixed ellipses mapped by ``(H, 3, 3)``
    similarities and the moving ellipses (``cf``/``cm``: ``(N, 2)``; ``covf``/``covm``: ``(N, 2, 2)``).

    Closed-form 2×2 algebra (determinants and inverses of symmetric matrices), vectorised
    over hypotheses and candidates: the search evaluates millions of pairs.
    """
    # Written out entry by entry: numpy's batched matmul of 2×2 matrices costs more than the algebra.
    a00, a01, a10, a11 = (matrices[:, i, j, None] for i, j in ((0, 0), (0, 1), (1, 0), (1, 1)))
    t0, t1 = matrices[:, 0, 2, None], matrices[:, 1, 2, None]
    f00, f01, f11 = covf[None, :, 0, 0], covf[None, :, 0, 1], covf[None, :, 1, 1]
    mx = a00 * cf[None, :, 0] + a01 * cf[None, :, 1] + t0
    my = a10 * cf[None, :, 0] + a11 * cf[None, :, 1] + t1
    # A Σ_f Aᵀ for the symmetric Σ_f.
    r00, r01 = a00 * f00 + a01 * f01, a00 * f01 + a01 * f11
    r10, r11 = a10 * f00 + a11 * f01, a10 * f01 + a11 * f11
    g00, g01, g11 = r00 * a00 + r01 * a01, r00 * a10 + r01 * a11, r10 * a10 + r11 * a11
    s00 = (g00 + covm[None, :, 0, 0]) / 2
    s01 = (g01 + covm[None, :, 0, 1]) / 2
    s11 = (g11 + covm[None, :, 1, 1]) / 2
    det = s00 * s11 - s01 * s01
    dx, dy = mx - cm[None, :, 0], my - cm[None, :, 1]
    maha = (s11 * dx * dx - 2 * s01 * dx * dy + s00 * dy * dy) / det / 8
    det1 = g00 * g11 - g01 * g01
    detm = covm[:, 0, 0] * covm[:, 1, 1] - covm[:, 0, 1] ** 2
    logdet = np.log(det) - 0.5 * (np.log(det1) + np.log(detm)[None])
    return np.exp(-maha - 0.5 * logdet)


def _two_point_hypotheses(zf: np.ndarray, zm: np.ndarray, weights: np.ndarray, count: int,
                          min_separation: float, rng: np.random.Generator) -> np.ndarray:
    """``(H, 3, 3)`` similarities through two candidates each (complex form ``z_m = a z_f + b``),
    drawn with probability ∝ ``weights``; degenerate and implausibly scaled ones are dropped."""
    n = len(zf)
    if n < 2:
        return np.zeros((0, 3, 3))
    p = weights / weights.sum()
    i, j = rng.choice(n, count, p=p), rng.choice(n, count, p=p)
    dz = zf[i] - zf[j]
    # Strictly apart as well: with every candidate at one centroid the spread, and so
    # min_separation, is 0, and a pair of coincident points defines no similarity.
    ok = (np.abs(dz) >= min_separation) & (np.abs(dz) > 0)
    i, j, dz = i[ok], j[ok], dz[ok]
    a = (zm[i] - zm[j]) / dz
    ok = (np.abs(a) >= 1 / MAX_SCALE) & (np.abs(a) <= MAX_SCALE)
    return _similarities(a[ok], (zm[i] - a * zf[i])[ok])


def _similarities(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``(H, 3, 3)`` homogeneous matrices of the similarities ``z ↦ a z + b`` (complex ``(H,)``)."""
    out = np.zeros((len(a), 3, 3))
    out[:, 0, 0], out[:, 0, 1], out[:, 0, 2] = a.real, -a.imag, b.real
    out[:, 1, 0], out[:, 1, 1], out[:, 1, 2] = a.imag, a.real, b.imag
    out[:, 2, 2] = 1.0
    return out


def fit_similarity(src: np.ndarray, dst: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Least-squares ``(3, 3)`` similarity taking ``(N, 2)`` ``src`` to ``dst`` with weights (Umeyama)."""
    w = w / w.sum()
    ms, md = w @ src, w @ dst
    a, b = src - ms, dst - md
    u, s, vt = np.linalg.svd((w[:, None] * b).T @ a)
    d = np.diag([1.0, np.sign(np.linalg.det(u @ vt))])
    rot = u @ d @ vt
    scale = float(np.trace(np.diag(s) @ d)) / max(float(w @ (a**2).sum(1)), 1e-12)
    out = np.eye(3)
    out[:2, :2] = scale * rot
    out[:2, 2] = md - scale * rot @ ms
    return out


def _group_starts(fj: np.ndarray) -> np.ndarray:
    """Where each fixed ROI's run of candidates begins in ``fj`` (candidates grouped by fixed ROI)."""
    return np.flatnonzero(np.r_[True, fj[1:] != fj[:-1]])


def _per_fixed_best(values: np.ndarray, fj: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For ``(N,)`` values over candidates grouped by fixed ROI ``fj``: the ``(G,)`` maximum per
    fixed ROI and the ``(G,)`` index of the first candidate reaching it."""
    starts = _group_starts(fj)
    best = np.maximum.reduceat(values, starts)
    group = np.repeat(np.arange(len(starts)), np.diff(np.r_[starts, len(fj)]))
    hits = np.flatnonzero(values == best[group])
    first = hits[np.r_[True, group[hits][1:] != group[hits][:-1]]]
    return best, first


def consensus_similarity(fixed: RegionMoments, moving: RegionMoments, top_k: int = 2, slice_range: int = 0,
                         hypotheses: int = 2000, min_agreement: float = 0.5, min_pairs: int = 3,
                         seed: int = 0, starts: int = 4) -> GlobalMatch:
    """The in-plane similarity most ROI candidates agree with (see the module docstring).

    Args:
        fixed, moving: ROI moments of the two images.
        top_k: Candidates per fixed ROI (its most similar moving ROIs).
        slice_range: 3D: moving slices searched on each side of a fixed ROI's slice.
        hypotheses: Two-candidate samples drawn (seeded: the result is reproducible).
        min_agreement: Overlap coefficient a candidate needs to count as agreeing.
        min_pairs: Fewer agreeing fixed ROIs than this keep the identity.
        seed: Seed of the sampling.
        starts: Distinct best-scoring hypotheses refined (the best refined one wins).

    Returns:
        The best refined hypothesis (:func:`_refine`); the identity when it scores at least as
        well or too few ROIs agree.
    """
    fj, mi, sim = _candidates(fixed, moving, top_k, slice_range)
    identity = np.eye(3)
    if len(fj) == 0:
        return _match(identity, fj, mi, np.zeros(0), 0.0, 0.0)
    cf, covf = fixed.centroids[fj], fixed.covariances[fj]
    cm, covm = moving.centroids[mi], moving.covariances[mi]
    zf, zm = cf[:, 0] + 1j * cf[:, 1], cm[:, 0] + 1j * cm[:, 1]
    spread = float(np.ptp(fixed.centroids, axis=0).max()) if len(fixed) > 1 else 0.0
    rng = np.random.default_rng(seed)
    hyps = np.concatenate([identity[None], _two_point_hypotheses(zf, zm, sim, hypotheses, 0.1 * spread, rng)])
    scores = np.concatenate([
        _per_fixed_max(_agreeing(_overlap(chunk, cf, covf, cm, covm), min_agreement) * sim, fj).sum(axis=1)
        for chunk in np.array_split(hyps, max(1, len(hyps) // 256))
    ])
    # Refine on every plausible pair, not only the candidates: under a good hypothesis the right
    # partner of a region is the one it overlaps, whichever rank its prototype had.
    dense = _candidates(fixed, moving, len(moving), slice_range)
    best, (fsel, msel, weight), score = identity, (fj[:0], mi[:0], np.zeros(0)), -np.inf
    for start in _distinct_best(hyps, scores, spread, starts):
        refined = _refine(start, fixed, moving, dense, min_agreement, min_pairs, spread)
        sel, value = _associate(refined, fixed, moving, dense, min_agreement)
        if value > score:
            best, (fsel, msel, weight), score = refined, sel, value
    id_sel, id_score = _associate(identity, fixed, moving, dense, min_agreement)
    if len(fsel) < min_pairs or score <= id_score:
        return _match(identity, id_sel[0], id_sel[1], id_sel[2], id_score, id_score)
    return _match(best, fsel, msel, weight, score, id_score)


def agreement(matrix: np.ndarray, fixed: RegionMoments, moving: RegionMoments, slice_range: int = 0,
              min_agreement: float = 0.5) -> GlobalMatch:
    """The ROI pairs that agree with a given ``(3, 3)`` in-plane map (e.g. the identity): each
    fixed ROI's best agreeing partner among every moving ROI of the slices searched."""
    (fj, mi, bc), score = _associate(matrix, fixed, moving, _candidates(fixed, moving, len(moving), slice_range),
                                     min_agreement)
    return _match(matrix, fj, mi, bc, score, score)


def _distinct_best(hyps: np.ndarray, scores: np.ndarray, spread: float, count: int) -> list[np.ndarray]:
    """The ``count`` best-scoring hypotheses that differ from each better one (by more than 5°,
    5 % in scale or 5 % of ``spread`` in where they take the origin)."""
    chosen: list[np.ndarray] = []
    for h in np.argsort(-scores, kind="stable"):
        m = hyps[h]
        if all(not _close(m, c, spread) for c in chosen):
            chosen.append(m)
            if len(chosen) == count:
                break
    return chosen


def _close(a: np.ndarray, b: np.ndarray, spread: float) -> bool:
    za, zb = complex(a[0, 0], a[1, 0]), complex(b[0, 0], b[1, 0])
    turn = abs(np.angle(za / zb)) if zb != 0 else np.pi
    return bool(turn < np.radians(5.0) and abs(np.log(abs(za) / abs(zb))) < 0.05
                and np.hypot(*(a[:2, 2] - b[:2, 2])) < 0.05 * max(spread, 1e-9))


def _refine(matrix: np.ndarray, fixed: RegionMoments, moving: RegionMoments, dense: tuple[np.ndarray, ...],
            min_agreement: float, min_pairs: int, spread: float) -> np.ndarray:
    """Refine a hypothesis: weighted least squares on the centroids of its agreeing partners,
    then a compass search that climbs the score itself.

    Least squares on centroids is pulled off by regions the two segmentations cut differently
    (their centroids move with the cut); the score weighs whole ellipses, so the search ends
    where the most regions overlap best.
    """
    # Both steps move the hypothesis a little: each fixed ROI's partners that matter are among
    # those it overlaps most at the start.
    pool = _nearest_partners(matrix, fixed, moving, dense, POOL)
    for _ in range(5):
        sel, _ = _associate(matrix, fixed, moving, pool, min_agreement)
        if len(sel[0]) < max(min_pairs, 2):
            break
        matrix = fit_similarity(fixed.centroids[sel[0]], moving.centroids[sel[1]], sel[2])
    return _compass_search(matrix, fixed, moving, pool, min_agreement, spread)


def _compass_search(matrix: np.ndarray, fixed: RegionMoments, moving: RegionMoments, cands: tuple[np.ndarray, ...],
                    min_agreement: float, spread: float, rounds: int = 200) -> np.ndarray:
    """Maximise the score over (rotation, log scale, translation) about the fixed ROIs' mean
    centroid: try ± a step on each, take the best strict gain, halve the steps when none gains.

    For speed the score is taken over each fixed ROI's few best partners at the current
    transform (:func:`_nearest_partners` among ``cands``), chosen again at every halving.
    """
    if len(cands[0]) == 0:
        return matrix
    z0 = complex(*fixed.centroids.mean(axis=0))
    a = complex(matrix[0, 0], matrix[1, 0])
    w = a * z0 + complex(matrix[0, 2], matrix[1, 2])  # where z0 goes
    params = np.array([np.angle(a), np.log(abs(a)), w.real, w.imag])
    step = np.array([np.radians(2.0), 0.02, 0.02 * spread, 0.02 * spread])
    moves = np.concatenate([np.eye(4), -np.eye(4)])
    score, best = None, -np.inf
    for _ in range(rounds):
        if score is None:
            score = _score_over(_nearest_partners(_from_params(params[None], z0)[0], fixed, moving, cands, KEEP),
                                fixed, moving, min_agreement, z0)
            best = float(score(params[None])[0])
        trial = params + moves * step
        values = score(trial)
        k = int(np.argmax(values))
        if values[k] > best + 1e-12:
            params, best = trial[k], float(values[k])
        elif step[0] > np.radians(0.02):
            step, score = step / 2, None
        else:
            break
    return _from_params(params[None], z0)[0]


#: Partners per fixed ROI the compass search scores, chosen among its ``POOL`` best at the start.
KEEP, POOL = 3, 16


def _score_over(cands: tuple[np.ndarray, ...], fixed: RegionMoments, moving: RegionMoments, min_agreement: float,
                z0: complex):
    """The score of ``(H, 4)`` parameter rows (see :func:`_from_params`) over ``cands``."""
    fj, mi, sim = cands
    cf, covf, cm, covm = fixed.centroids[fj], fixed.covariances[fj], moving.centroids[mi], moving.covariances[mi]

    def score(p: np.ndarray) -> np.ndarray:
        if len(fj) == 0:
            return np.zeros(len(p))
        return _per_fixed_max(_agreeing(_overlap(_from_params(p, z0), cf, covf, cm, covm), min_agreement) * sim,
                              fj).sum(axis=1)
    return score


def _nearest_partners(matrix: np.ndarray, fixed: RegionMoments, moving: RegionMoments,
                      cands: tuple[np.ndarray, ...], keep: int) -> tuple[np.ndarray, ...]:
    """The ``keep`` candidates of each fixed ROI with the highest similarity × overlap under
    ``matrix`` (those with any overlap), still grouped by fixed ROI."""
    fj, mi, sim = cands
    value = sim * _overlap(matrix[None], fixed.centroids[fj], fixed.covariances[fj], moving.centroids[mi],
                           moving.covariances[mi])[0]
    order = np.lexsort((-value, fj))
    starts = _group_starts(fj[order])
    rank = np.arange(len(order)) - np.repeat(starts, np.diff(np.r_[starts, len(order)]))
    sel = np.sort(order[(rank < keep) & (value[order] > 0)])
    return fj[sel], mi[sel], sim[sel]


def _from_params(params: np.ndarray, z0: complex) -> np.ndarray:
    """``(H, 3, 3)`` similarities ``z ↦ a (z − z0) + w`` from ``(H, 4)`` (angle, log scale, Re w, Im w)."""
    a = np.exp(params[:, 1] + 1j * params[:, 0])
    return _similarities(a, params[:, 2] + 1j * params[:, 3] - a * z0)


def _per_fixed_max(values: np.ndarray, fj: np.ndarray) -> np.ndarray:
    """``(H, G)`` maximum of ``(H, N)`` values per fixed ROI (candidates grouped by ``fj``)."""
    return np.maximum.reduceat(values, _group_starts(fj), axis=1)


def _associate(matrix: np.ndarray, fixed: RegionMoments, moving: RegionMoments, cands: tuple[np.ndarray, ...],
               min_agreement: float) -> tuple[tuple[np.ndarray, np.ndarray, np.ndarray], float]:
    """Under ``matrix``, each fixed ROI's best agreeing partner among ``cands``: ``(fixed index,
    moving index, overlap)`` arrays and the score (sum of similarity × overlap)."""
    fj, mi, sim = cands
    if len(fj) == 0:
        return (fj, mi, np.zeros(0)), 0.0
    bc = _overlap(matrix[None], fixed.centroids[fj], fixed.covariances[fj], moving.centroids[mi],
                  moving.covariances[mi])[0]
    value, idx = _per_fixed_best(_agreeing(bc, min_agreement) * sim, fj)
    sel = idx[bc[idx] >= min_agreement]
    return (fj[sel], mi[sel], bc[sel]), float(value.sum())


def _agreeing(overlap: np.ndarray, threshold: float) -> np.ndarray:
    """The overlap where it reaches ``threshold``, else 0: near misses do not add up to a score."""
    return np.where(overlap >= threshold, overlap, 0.0)


def _match(matrix, fj, mi, bc, score, id_score) -> GlobalMatch:
    return GlobalMatch(matrix, np.asarray(fj), np.asarray(mi), np.asarray(bc), float(score), float(id_score))


def _slice_frame(grid: Grid, axis: int | None) -> np.ndarray:
    """``(ndim+1, ndim+1)`` map from physical points to the slice frame: in-plane mm from the
    first pixel in (column, row) order, then (3D) the through-plane mm."""
    n = grid.ndim
    to_index = np.linalg.inv(grid.index_to_world_matrix())  # physical -> index (x, y[, z])
    if n == 2:
        order = [0, 1]
    else:
        comp = [n - 1 - a for a in range(n)]  # array axis -> index component
        in_plane = [a for a in range(n) if a != axis]
        order = [comp[in_plane[1]], comp[in_plane[0]], comp[axis]]
    scale = np.eye(n + 1)
    for row, c in enumerate(order):
        scale[row, :] = 0.0
        scale[row, c] = grid.spacing[c]
    return scale @ to_index


def to_physical(matrix: np.ndarray, fixed_grid: Grid, moving_grid: Grid, axis: int | None = None) -> np.ndarray:
    """The in-plane ``(3, 3)`` similarity as a ``(ndim+1, ndim+1)`` map of fixed physical mm to
    moving physical mm; in 3D every slice moves alike and the through-plane position maps to
    the same slice index."""
    n = fixed_grid.ndim
    lift = np.eye(n + 1)
    lift[:2, :2] = matrix[:2, :2]
    lift[:2, n] = matrix[:2, 2]
    if n == 3:
        comp = 2 - axis
        lift[2, 2] = moving_grid.spacing[comp] / fixed_grid.spacing[comp]
    return np.linalg.inv(_slice_frame(moving_grid, axis)) @ lift @ _slice_frame(fixed_grid, axis)
