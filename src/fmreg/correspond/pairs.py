"""ROI pairs of two images: segment everything, pool prototypes, match (paper 002, Alg. 1).

2D images are one slice. 3D images are cut into slices along the through-plane axis (the
array axis with the coarsest spacing); the ROIs of fixed slice ``s`` are matched against
the ROIs of moving slices ``s-δs … s+δs`` (Alg. 1, Table 5) and each matched pair is lifted
back into 3D as two single-slice masks, so the dense fit can move tissue between slices.

:func:`fmreg.correspond.labels.label_roi_pairs` (the paper's Case 1) takes the pairs straight
from label maps instead; it is an upper bound.
"""

from __future__ import annotations

import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Sequence

import numpy as np
import torch
from torch import Tensor

from fmreg.core.grid import Grid, mask_centroids, through_plane_axis
from fmreg.core.image import Image
from fmreg.correspond.consensus import GlobalMatch, agreement, consensus_similarity, region_moments, to_physical
from fmreg.correspond.levels import redraw_pairs
from fmreg.correspond.matching import SIMILARITY_THRESHOLD, match_rois, similarity_matrix
from fmreg.correspond.outlines import outline_points, refine_on_outlines
from fmreg.correspond.prototypes import roi_prototypes
from fmreg.segment.base import Encoder, RoiProposals, Segmenter
from fmreg.segment.object import object_mask
from fmreg.segment.filtering import (MAX_AREA_FRAC, MAX_BORDER_OUTLINE, MAX_OVERLAP, MIN_AREA_FRAC, MIN_SCORE,
                                     MIN_STABILITY, OverlapCache, filter_proposals, mask_areas)

__all__ = ["Correspondences", "RoiPair", "SamRegOptions", "find_correspondences", "find_roi_pairs"]

log = logging.getLogger("fmreg")


@dataclass
class RoiPair:
    """One matched ROI pair.

    Attributes:
        fixed_mask: ``(*fixed.grid.shape)`` bool mask in the fixed image.
        moving_mask: ``(*moving.grid.shape)`` bool mask in the moving image.
        similarity: Prototype similarity in [0, 1] (1 for label pairs).
        fixed_slice, moving_slice: Slice index along the through-plane axis (3D), else None.
        source: ``"match"``, ``"consensus"`` or ``"labels:<value>"``.
        grids: ``(fixed grid, moving grid)`` of the masks when they are not the images' own (a
            large image registered on a resampled copy), else None.
    """

    fixed_mask: Tensor
    moving_mask: Tensor
    similarity: float
    fixed_slice: int | None = None
    moving_slice: int | None = None
    source: str = "match"
    grids: tuple[Grid, Grid] | None = None

    def summary(self, fixed_grid: Grid, moving_grid: Grid) -> dict:
        """JSON-ready: similarity, sizes (voxels, and ``*_area_mm2`` in 2D or ``*_volume_mm3`` in
        3D), physical centroids (mm). ``grids`` (when set) overrides the grids given."""
        if self.grids is not None:
            fixed_grid, moving_grid = self.grids
        fixed_voxel = float(np.prod(fixed_grid.spacing))
        moving_voxel = float(np.prod(moving_grid.spacing))
        # The key carries the unit: a 3D ROI (a one-voxel-thick slab for a slice ROI) has a
        # volume, and calling it an area in "mm" misled readers of result.json.
        size = "area_mm2" if fixed_grid.ndim == 2 else "volume_mm3"
        return {
            "similarity": round(float(self.similarity), 4),
            "fixed_area_voxels": int(self.fixed_mask.sum()),
            "moving_area_voxels": int(self.moving_mask.sum()),
            f"fixed_{size}": round(float(self.fixed_mask.sum()) * fixed_voxel, 3),
            f"moving_{size}": round(float(self.moving_mask.sum()) * moving_voxel, 3),
            "fixed_centroid_mm": _centroid_mm(self.fixed_mask, fixed_grid),
            "moving_centroid_mm": _centroid_mm(self.moving_mask, moving_grid),
            "fixed_slice": self.fixed_slice,
            "moving_slice": self.moving_slice,
            "source": self.source,
        }


def _centroid_mm(mask: Tensor, grid: Grid) -> list[float]:
    """World centroid of one mask, mm rounded to µm (components x, y[, z])."""
    return [round(float(v), 3) for v in mask_centroids(mask[None], grid)[0]]


@dataclass
class SamRegOptions:
    """Settings of the ROI stage (the fit has its own ``FitOptions``).

    Attributes:
        min_area_frac, max_area_frac: ROI area bounds as fractions of the slice (paper: 200
            and 7000 px on 200×200).
        max_overlap: Overlap ratio above which the lower-scoring of two ROIs is dropped (0.8).
        min_score, min_stability: Score thresholds; None takes the segmenter's own
            ``filter_thresholds`` (the classical scores live on another scale than SAM's) or
            else the paper's 0.90 (pred-IoU and stability for SAM).
        threshold: Similarity threshold ε (paper default 0.8, Table 4).
        matching: ``"greedy"`` (paper), ``"optimal"`` (Hungarian) or ``"one_to_many"`` (Table 6).
        top_k: Keep only the K most similar pairs per slice (Table 3: 5 is best); None
            keeps all.
        slice_range: δs, moving slices searched around each fixed slice (3D, Table 5).
        max_shift_frac: Pairs whose centroids are further apart than this fraction of the
            field of view are dropped: two similar structures far apart (left and right
            lung) must not pair up, whatever the encoder's features say.
        max_area_ratio: Pairs whose areas differ by more than this factor are dropped
            (a cardiac ventricle changes its area up to about 2× between ED and ES).
        keep_border_regions: False drops background proposals before matching: regions cut
            out by the field of view and regions mostly outside the imaged object (see
            :func:`fmreg.segment.filtering.filter_proposals`); True keeps them (the paper).
        global_transform: Find the in-plane similarity that most ROI candidates agree with
            (:mod:`fmreg.correspond.consensus`) over every proposal of area at least
            ``global_min_area_frac`` (no score filter: many repeatable regions beat a few
            confident ones); the position gate then applies after it, and the fit starts
            from it.
        global_top_k: Candidates per fixed ROI in that search.
        global_agreement: Moment-ellipse overlap a candidate needs to agree.
        global_min_area_frac: Smallest ROI of that search, fraction of the slice area.
        pair_source: ``"matched"``: the pairs of the prototype matching (paper 002);
            ``"consensus"``: the candidates that agree with the global transform.
        redraw_masks: Redraw the masks of the pairs after the global transform as one kind of
            iso-intensity region in both images, dropping those that do not redraw alike
            (:mod:`fmreg.correspond.levels`; off: it does not carry over to real pairs).
    """

    min_area_frac: float = MIN_AREA_FRAC
    max_area_frac: float = MAX_AREA_FRAC
    max_overlap: float = MAX_OVERLAP
    min_score: float | None = None
    min_stability: float | None = None
    threshold: float = SIMILARITY_THRESHOLD
    matching: str = "greedy"
    top_k: int | None = 5
    slice_range: int = 1
    max_shift_frac: float = 0.2
    max_area_ratio: float = 2.5
    keep_border_regions: bool = False
    global_transform: bool = True
    global_top_k: int = 2
    global_agreement: float = 0.7
    global_min_area_frac: float = 0.001
    pair_source: str = "matched"
    redraw_masks: bool = False


#: Overlap above which the global search drops the lower-scoring of two proposals: only near
#: duplicates go, nested regions of different size both vote.
GLOBAL_MAX_OVERLAP = 0.9


# ---------------------------------------------------------------------------- slices


def _slices(image: Image, axis: int | None) -> list[Tensor]:
    """The image as ``(H, W)`` float slices along ``axis``; a 2D image (axis None) is one."""
    if axis is None:
        return [image.data.float()]
    return [image.data.float().select(axis, i) for i in range(image.data.shape[axis])]


def _lift(mask2d: Tensor, shape: Sequence[int], axis: int | None, index: int | None) -> Tensor:
    """A slice mask as a mask of the whole image: zero outside slice ``index`` of ``axis``."""
    if axis is None:
        return mask2d
    out = torch.zeros(tuple(shape), dtype=torch.bool)
    out.select(axis, index).copy_(mask2d)
    return out


def _score_thresholds(segmenter: Segmenter, opt: SamRegOptions) -> tuple[float, float]:
    """``(min_score, min_stability)``: the options', else the segmenter's own, else the paper's.

    Backends whose scores are not calibrated like SAM's say so with ``filter_thresholds``.
    """
    own = getattr(segmenter, "filter_thresholds", {}) or {}
    min_score = opt.min_score if opt.min_score is not None else own.get("min_score", MIN_SCORE)
    min_stability = (
        opt.min_stability
        if opt.min_stability is not None
        else own.get("min_stability", MIN_STABILITY)
    )
    return min_score, min_stability


def _object_slices(image: Image, axis: int | None, opt: SamRegOptions) -> list[Tensor | None]:
    """The imaged object in each ``(H, W)`` slice, for the background rule; None where unknown
    (no object wholly in view, or background regions kept)."""
    n = 1 if axis is None else image.data.shape[axis]
    obj = None if opt.keep_border_regions else object_mask(image)
    if obj is None:
        return [None] * n
    return [obj] if axis is None else [obj.select(axis, i) for i in range(n)]


@dataclass
class SliceRois:
    """The ROIs of one slice: ``props``/``prototypes`` passed every filter (for matching);
    ``candidates``/``candidate_prototypes`` passed only the area rule (for the global search)."""

    props: RoiProposals
    prototypes: Tensor
    candidates: RoiProposals
    candidate_prototypes: Tensor


def _analyse(
    slices: list[Tensor], objects: list[Tensor | None], segmenter: Segmenter, encoder: Encoder, opt: SamRegOptions
) -> list[SliceRois]:
    """Filtered proposals and their ``(K, C)`` prototypes, for every ``(H, W)`` slice.

    ``objects`` holds the imaged object of each slice (:func:`_object_slices`).
    """
    min_score, min_stability = _score_thresholds(segmenter, opt)
    border = None if opt.keep_border_regions else MAX_BORDER_OUTLINE

    def one(img: Tensor, obj: Tensor | None) -> SliceRois:
        raw = segmenter.segment(img)
        # The light filter first: its candidates include the strict one's (smaller minimum
        # area, no score rules), so the strict filter reuses its pairwise overlaps.
        overlaps = OverlapCache(raw.masks.bool())
        light = RoiProposals.empty(tuple(img.shape))
        if opt.global_transform:
            light = filter_proposals(raw, min_area_frac=opt.global_min_area_frac, max_area_frac=opt.max_area_frac,
                                     max_overlap=GLOBAL_MAX_OVERLAP, min_score=0.0, min_stability=0.0,
                                     overlaps=overlaps)
        props = filter_proposals(
            raw,
            min_area_frac=opt.min_area_frac,
            max_area_frac=opt.max_area_frac,
            max_overlap=opt.max_overlap,
            min_score=min_score,
            min_stability=min_stability,
            max_border_outline=border,
            object_mask=obj,
            overlaps=overlaps,
        )
        if not len(props) and not len(light):
            return SliceRois(props, torch.zeros(0, 1), light, torch.zeros(0, 1))
        features = encoder.features(img)
        return SliceRois(props, roi_prototypes(features, props.masks), light, roi_prototypes(features, light.masks))

    classical = segmenter.name == "classical" and encoder.name == "classical"
    if not classical or len(slices) < 2:
        return [one(img, obj) for img, obj in zip(slices, objects)]
    # Classical per-slice work is many small numpy/torch ops: one torch thread per slice and
    # one slice per core beats intra-op threading (measured: 20 ms vs ~1 s per slice under load).
    n_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with ThreadPoolExecutor(max_workers=max(1, os.cpu_count() or 1)) as pool:
            return list(pool.map(one, slices, objects))
    finally:
        torch.set_num_threads(n_threads)


# ---------------------------------------------------------------------------- matching


def _slice_centroids_mm(masks: Tensor, spacing_rc: Sequence[float]) -> Tensor:
    """In-slice centroids of ``(K, H, W)`` masks: ``(K, 2)`` float32 (row, column) in mm.

    Measured from each slice's first pixel rather than placed in the world as
    :func:`~fmreg.core.grid.mask_centroids` does: the plausibility gate compares
    positions within the two fields of view, whatever the images' origins and directions.
    """
    if masks.shape[0] == 0:
        return torch.zeros(0, 2)
    k, h, w = masks.shape
    rows = torch.arange(h, dtype=torch.float32)[None, :, None]
    cols = torch.arange(w, dtype=torch.float32)[None, None, :]
    m = masks.float()
    area = m.sum(dim=(1, 2)).clamp_min(1)
    r = (m * rows).sum(dim=(1, 2)) / area
    c = (m * cols).sum(dim=(1, 2)) / area
    return torch.stack([r * spacing_rc[0], c * spacing_rc[1]], dim=1)


@dataclass(frozen=True)
class _SliceGeometry:
    """In-plane spacings (mm, array order) of both images and the fixed field of view (mm)."""

    spacing_fixed: list[float]
    spacing_moving: list[float]
    fov: float


def _slice_geometry(fixed: Image, moving: Image, axis: int | None) -> _SliceGeometry:
    in_plane = [i for i in range(fixed.ndim) if i != axis] if axis is not None else [0, 1]
    sp_f = [fixed.grid.spacing_array[i] for i in in_plane]
    sp_m = [moving.grid.spacing_array[i] for i in in_plane]
    fov = max(n * s for n, s in zip([fixed.grid.shape[i] for i in in_plane], sp_f))
    return _SliceGeometry(sp_f, sp_m, fov)


def _plausible(
    moving_masks: Tensor, fixed_masks: Tensor, geo: _SliceGeometry, opt: SamRegOptions,
    global_matrix: np.ndarray | None = None,
) -> Tensor:
    """``(K_moving, K_fixed)`` bool: centroids close enough and areas alike enough to pair.

    The gates on position and size of :class:`SamRegOptions` (``max_shift_frac``,
    ``max_area_ratio``); masks are ``(K, H, W)`` slices of the moving / fixed image. With
    ``global_matrix`` (an in-plane ``(3, 3)`` map of :mod:`fmreg.correspond.consensus`) the
    fixed centroids are first mapped by it, so the position gate bounds what is left after
    the global move.
    """
    fixed_c = _slice_centroids_mm(fixed_masks, geo.spacing_fixed)
    if global_matrix is not None and len(fixed_c):
        xy = fixed_c.flip(1).double() @ torch.as_tensor(global_matrix[:2, :2]).T + torch.as_tensor(global_matrix[:2, 2])
        fixed_c = xy.flip(1).float()
    shift = torch.cdist(_slice_centroids_mm(moving_masks, geo.spacing_moving), fixed_c)
    area_m = mask_areas(moving_masks).float() * float(np.prod(geo.spacing_moving))
    area_f = mask_areas(fixed_masks).float() * float(np.prod(geo.spacing_fixed))
    ratio = torch.maximum(area_m[:, None] / area_f[None], area_f[None] / area_m[:, None])
    return (shift <= opt.max_shift_frac * geo.fov) & (ratio <= opt.max_area_ratio)


def _match_slice(
    fixed_an: SliceRois,
    moving_an: list[SliceRois],
    moving_slices: range,
    geo: _SliceGeometry,
    opt: SamRegOptions,
    global_matrix: np.ndarray | None = None,
) -> list[tuple[int, int, int, float]]:
    """Match the ROIs of one fixed slice against those of the moving slices searched.

    Returns:
        ``(fixed ROI index, moving slice, moving ROI index, similarity)`` per match.
    """
    fp, fproto = fixed_an.props, fixed_an.prototypes
    cand = [(s2, i) for s2 in moving_slices for i in range(len(moving_an[s2].props))]
    if not cand:
        return []
    mprotos = torch.cat([moving_an[s2].prototypes[i : i + 1] for s2, i in cand])
    mmasks = torch.stack([moving_an[s2].props.masks[i] for s2, i in cand])
    sim = similarity_matrix(mprotos, fproto)  # (K_moving, K_fixed)
    plausible = _plausible(mmasks, fp.masks, geo, opt, global_matrix)
    sim = torch.where(plausible, sim, torch.zeros_like(sim))
    matches = match_rois(sim, threshold=opt.threshold, mode=opt.matching, top_k=opt.top_k)
    return [(m.fixed_index, *cand[m.moving_index], float(m.similarity)) for m in matches]


@dataclass
class Correspondences:
    """What the ROI stage found.

    Attributes:
        local_pairs: ROI pairs as if nothing moved globally (the position gate on raw positions).
        global_pairs: ROI pairs for a fit that starts from the global transform (the position
            gate after it; ``pair_source`` says which), or None without one.
        global_match: The consensus similarity (:mod:`fmreg.correspond.consensus`), or None
            when the search is off.
        global_affine: ``(ndim+1, ndim+1)`` its map of fixed physical mm to moving physical mm,
            or None when the search is off or kept the identity.
        identity_pairs: The search's candidates that agree with no move, when asked for.
    """

    local_pairs: list[RoiPair]
    global_pairs: list[RoiPair] | None = None
    global_match: GlobalMatch | None = None
    global_affine: np.ndarray | None = None
    identity_pairs: list[RoiPair] | None = None


def _global_search(f_an: list[SliceRois], m_an: list[SliceRois], geo: _SliceGeometry, opt: SamRegOptions,
                   threed: bool, unmoved: bool) -> tuple[GlobalMatch, GlobalMatch | None]:
    """The consensus and (with ``unmoved``) the candidates that agree with no move."""
    fixed = region_moments([a.candidates.masks for a in f_an], [a.candidate_prototypes for a in f_an], geo.spacing_fixed)
    moving = region_moments([a.candidates.masks for a in m_an], [a.candidate_prototypes for a in m_an], geo.spacing_moving)
    slice_range = opt.slice_range if threed else 0
    match = consensus_similarity(fixed, moving, top_k=opt.global_top_k, slice_range=slice_range,
                                 min_agreement=opt.global_agreement)
    if not np.allclose(match.matrix, np.eye(3)):
        match = _on_outlines(match, f_an, m_an, geo)
    return match, agreement(np.eye(3), fixed, moving, slice_range, opt.global_agreement) if unmoved else None


def _on_outlines(match: GlobalMatch, f_an: list[SliceRois], m_an: list[SliceRois], geo: _SliceGeometry) -> GlobalMatch:
    """The consensus with its similarity refined on the agreeing candidates' outlines
    (:mod:`fmreg.correspond.outlines`); the agreeing candidates stay as they are."""
    def masks(an: list[SliceRois]) -> list[Tensor]:
        return [m for a in an for m in a.candidates.masks]

    fixed, moving = masks(f_an), masks(m_an)
    f_out = [outline_points(fixed[j], geo.spacing_fixed) for j in match.fixed_index]
    m_out = [outline_points(moving[i], geo.spacing_moving) for i in match.moving_index]
    matrix = refine_on_outlines(match.matrix, f_out, m_out, floor_mm=max(geo.spacing_moving))
    return replace(match, matrix=matrix)


def _consensus_pairs(match: GlobalMatch, f_an: list[SliceRois], m_an: list[SliceRois], fixed: Image,
                     moving: Image, axis: int | None) -> list[RoiPair]:
    """The agreeing candidates of the global search as ROI pairs (similarity = overlap)."""
    def index(an: list[SliceRois]) -> list[tuple[int, int]]:
        return [(s, i) for s, a in enumerate(an) for i in range(len(a.candidates))]

    fidx, midx = index(f_an), index(m_an)
    pairs = []
    for j, i, agree in zip(match.fixed_index, match.moving_index, match.agreement):
        (s, a), (s2, b) = fidx[j], midx[i]
        pairs.append(_slice_pair(f_an[s].candidates.masks[a], m_an[s2].candidates.masks[b], s, s2, float(agree),
                                 fixed, moving, axis, "consensus"))
    return pairs


def _slice_pair(fixed_mask: Tensor, moving_mask: Tensor, s: int, s2: int, similarity: float, fixed: Image,
                moving: Image, axis: int | None, source: str = "match") -> RoiPair:
    """A pair of slice masks (fixed slice ``s``, moving slice ``s2``) lifted onto the images."""
    threed = axis is not None
    return RoiPair(_lift(fixed_mask, fixed.grid.shape, axis, s), _lift(moving_mask, moving.grid.shape, axis, s2),
                   similarity, s if threed else None, s2 if threed else None, source)


def find_correspondences(
    fixed: Image,
    moving: Image,
    segmenter: Segmenter,
    encoder: Encoder,
    options: SamRegOptions | None = None,
    timings: dict | None = None,
    identity_pairs: bool = False,
) -> Correspondences:
    """Segment everything in both images, find the global transform the ROIs agree on, and
    match ROIs by prototype similarity.

    Args:
        fixed, moving: Images of the same dimensionality. In 3D both are sliced along the
            fixed image's through-plane axis; their slice counts may differ.
        segmenter, encoder: Any backend pair (see :mod:`fmreg.segment.base`).
        options: ROI-stage settings.
        timings: Optional dict that receives stage durations in seconds.
        identity_pairs: Also return the candidates that agree with no global move.

    Returns:
        The pairs (masks on the full fixed / moving grids) and the global transform.
    """
    opt = options or SamRegOptions()
    timings = timings if timings is not None else {}
    axis = through_plane_axis(fixed.grid) if fixed.ndim == 3 else None
    t0 = time.perf_counter()
    fixed_slices, moving_slices = _slices(fixed, axis), _slices(moving, axis)
    log.info("samreg: segmenting and embedding %d fixed + %d moving slice(s)", len(fixed_slices), len(moving_slices))
    # One pool over both images' slices: two pools would each leave a worker idle on an odd count.
    analysed = _analyse(fixed_slices + moving_slices,
                        _object_slices(fixed, axis, opt) + _object_slices(moving, axis, opt), segmenter, encoder, opt)
    f_an, m_an = analysed[: len(fixed_slices)], analysed[len(fixed_slices):]
    timings["segment_embed"] = time.perf_counter() - t0

    t1 = time.perf_counter()
    geo = _slice_geometry(fixed, moving, axis)
    match, affine, matrix, still = None, None, None, None
    if opt.global_transform:
        match, unmoved = _global_search(f_an, m_an, geo, opt, axis is not None, identity_pairs)
        if unmoved is not None:
            still = _consensus_pairs(unmoved, f_an, m_an, fixed, moving, axis)
        if not np.allclose(match.matrix, np.eye(3)):
            matrix = match.matrix
            affine = to_physical(matrix, fixed.grid, moving.grid, axis)
        log.info("samreg: ROI consensus %s", match.summary())
    local = _matched_pairs(f_an, m_an, fixed, moving, axis, geo, opt, None)
    moved = None
    if matrix is not None:
        moved = (_consensus_pairs(match, f_an, m_an, fixed, moving, axis) if opt.pair_source == "consensus"
                 else _matched_pairs(f_an, m_an, fixed, moving, axis, geo, opt, matrix))
        if opt.redraw_masks:
            moved = redraw_pairs(moved, fixed.data, moving.data, matrix, geo.spacing_fixed, geo.spacing_moving, axis)
    timings["match"] = time.perf_counter() - t1
    log.info("samreg: %d ROI pair(s)%s", len(local), "" if moved is None else f", {len(moved)} after the global move")
    return Correspondences(local, moved, match, affine, still)


def _matched_pairs(f_an: list[SliceRois], m_an: list[SliceRois], fixed: Image, moving: Image, axis: int | None,
                   geo: _SliceGeometry, opt: SamRegOptions, matrix: np.ndarray | None) -> list[RoiPair]:
    """Prototype matching slice by slice (Alg. 1), the position gate after ``matrix``."""
    pairs: list[RoiPair] = []
    for s, an in enumerate(f_an):
        if len(an.props) == 0:
            continue
        lo = max(0, s - opt.slice_range) if axis is not None else 0
        hi = min(len(m_an) - 1, s + opt.slice_range) if axis is not None else 0
        for j, s2, i, similarity in _match_slice(an, m_an, range(lo, hi + 1), geo, opt, matrix):
            pairs.append(_slice_pair(an.props.masks[j], m_an[s2].props.masks[i], s, s2, similarity, fixed, moving, axis))
    return pairs


def find_roi_pairs(fixed: Image, moving: Image, segmenter: Segmenter, encoder: Encoder,
                   options: SamRegOptions | None = None, timings: dict | None = None) -> list[RoiPair]:
    """The ROI pairs of :func:`find_correspondences` without a global move (``local_pairs``)."""
    return find_correspondences(fixed, moving, segmenter, encoder, options, timings).local_pairs
