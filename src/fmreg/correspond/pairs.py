"""SAMReg end to end: segment everything, embed, match, fit (paper 002, Sec. 3.2, Alg. 1).

2D images are one slice. 3D images are cut into slices along the through-plane axis (the
array axis with the coarsest spacing); the ROIs of fixed slice ``s`` are matched against
the ROIs of moving slices ``s-δs … s+δs`` (Alg. 1, Table 5) and each matched pair is lifted
back into 3D as two single-slice masks, so the dense fit can move tissue between slices.

The ``labels`` backend (the paper's Case 1) takes the pairs straight from label maps; it is
an upper bound and the method that uses it carries its own name.
"""

from __future__ import annotations

import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Sequence

import numpy as np
import torch
from torch import Tensor

from fmreg.errors import FmregError
from fmreg.transforms.displacement import DisplacementField
from fmreg.core.grid import Grid, through_plane_axis
from fmreg.core.image import Image
from fmreg.evaluate.metrics import physical_centroid
from fmreg.segment.filtering import filter_proposals
from fmreg.optimize.fit import FitOptions, fit_field
from fmreg.correspond.matching import match_rois, similarity_matrix
from fmreg.segment.base import Encoder, RoiProposals, Segmenter
from fmreg.correspond.prototypes import roi_prototypes

log = logging.getLogger("fmreg")

#: Paper 002, Sec. 4.2: SAM's pred-iou-thresh and stability-score-thresh set to 0.90.
PAPER_SCORE_THRESHOLD = 0.90


@dataclass
class RoiPair:
    """One matched ROI pair.

    Attributes:
        fixed_mask: ``(*fixed.grid.shape)`` bool mask in the fixed image.
        moving_mask: ``(*moving.grid.shape)`` bool mask in the moving image.
        similarity: Prototype similarity in [0, 1] (1 for label pairs).
        fixed_slice, moving_slice: Slice index along the through-plane axis (3D), else None.
        source: ``"match"`` or ``"labels:<value>"``.
    """

    fixed_mask: Tensor
    moving_mask: Tensor
    similarity: float
    fixed_slice: int | None = None
    moving_slice: int | None = None
    source: str = "match"

    def summary(self, fixed_grid: Grid, moving_grid: Grid) -> dict:
        """JSON-ready: similarity, areas (voxels and mm²/mm³), physical centroids (mm)."""
        return {
            "similarity": round(float(self.similarity), 4),
            "fixed_area_voxels": int(self.fixed_mask.sum()),
            "moving_area_voxels": int(self.moving_mask.sum()),
            # mm² in 2D, mm³ in 3D (a slice ROI is a one-voxel-thick slab).
            "fixed_area_mm": round(float(self.fixed_mask.sum()) * float(np.prod(fixed_grid.spacing)), 3),
            "moving_area_mm": round(float(self.moving_mask.sum()) * float(np.prod(moving_grid.spacing)), 3),
            "fixed_centroid_mm": _centroid_mm(self.fixed_mask, fixed_grid),
            "moving_centroid_mm": _centroid_mm(self.moving_mask, moving_grid),
            "fixed_slice": self.fixed_slice,
            "moving_slice": self.moving_slice,
            "source": self.source,
        }


def _centroid_mm(mask: Tensor, grid: Grid) -> list[float]:
    return [round(float(v), 3) for v in physical_centroid(mask, grid)]


@dataclass
class SamRegOptions:
    """Settings of the ROI stage (the fit has its own :class:`FitOptions`).

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
    """

    min_area_frac: float = 200 / 40000
    max_area_frac: float = 7000 / 40000
    max_overlap: float = 0.8
    min_score: float | None = None
    min_stability: float | None = None
    threshold: float = 0.8
    matching: str = "greedy"
    top_k: int | None = 5
    slice_range: int = 1
    max_shift_frac: float = 0.2
    max_area_ratio: float = 2.5


@dataclass
class SamRegResult:
    field: DisplacementField
    pairs: list[RoiPair]
    timings: dict[str, float] = field(default_factory=dict)
    fit_report: dict = field(default_factory=dict)


def _slices(image: Image, axis: int | None) -> list[Tensor]:
    if axis is None:
        return [image.data.float()]
    return [image.data.float().select(axis, i) for i in range(image.data.shape[axis])]


def _lift(mask2d: Tensor, shape: Sequence[int], axis: int | None, index: int | None) -> Tensor:
    if axis is None:
        return mask2d
    out = torch.zeros(tuple(shape), dtype=torch.bool)
    out.select(axis, index).copy_(mask2d)
    return out


def _analyse(slices: list[Tensor], segmenter: Segmenter, encoder: Encoder, opt: SamRegOptions):
    """Filtered proposals and prototypes of every slice."""
    own = getattr(segmenter, "filter_thresholds", {}) or {}
    min_score = opt.min_score if opt.min_score is not None else own.get("min_score", PAPER_SCORE_THRESHOLD)
    min_stability = (
        opt.min_stability if opt.min_stability is not None else own.get("min_stability", PAPER_SCORE_THRESHOLD)
    )

    def one(img: Tensor):
        props = filter_proposals(
            segmenter.segment(img),
            min_area_frac=opt.min_area_frac,
            max_area_frac=opt.max_area_frac,
            max_overlap=opt.max_overlap,
            min_score=min_score,
            min_stability=min_stability,
        )
        protos = roi_prototypes(encoder.features(img), props.masks) if len(props) else torch.zeros(0, 1)
        return props, protos

    classical = segmenter.name == "classical" and encoder.name == "classical"
    if not classical or len(slices) < 2:
        return [one(img) for img in slices]
    # Classical per-slice work is many small numpy/torch ops: one torch thread per slice and
    # one slice per core beats intra-op threading (measured: 20 ms vs ~1 s per slice under load).
    n_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with ThreadPoolExecutor(max_workers=max(1, os.cpu_count() or 1)) as pool:
            return list(pool.map(one, slices))
    finally:
        torch.set_num_threads(n_threads)


def _centroids_mm_2d(masks: Tensor, spacing_rc: Sequence[float]) -> Tensor:
    """``(K, 2)`` in-slice centroids (row, col) in mm."""
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


def find_roi_pairs(
    fixed: Image,
    moving: Image,
    segmenter: Segmenter,
    encoder: Encoder,
    options: SamRegOptions | None = None,
    timings: dict | None = None,
) -> list[RoiPair]:
    """Segment everything in both images and match ROIs by prototype similarity.

    Args:
        fixed, moving: Images of the same dimensionality. In 3D both are sliced along the
            fixed image's through-plane axis; their slice counts may differ.
        segmenter, encoder: Any backend pair (see :mod:`fmreg.segment.base`).
        options: ROI-stage settings.
        timings: Optional dict that receives stage durations in seconds.

    Returns:
        Matched pairs, masks on the full fixed / moving grids.
    """
    opt = options or SamRegOptions()
    timings = timings if timings is not None else {}
    axis = through_plane_axis(fixed.grid) if fixed.ndim == 3 else None
    t0 = time.perf_counter()
    fixed_slices, moving_slices = _slices(fixed, axis), _slices(moving, axis)
    log.info("samreg: segmenting and embedding %d fixed + %d moving slice(s)", len(fixed_slices), len(moving_slices))
    f_an = _analyse(fixed_slices, segmenter, encoder, opt)
    m_an = _analyse(moving_slices, segmenter, encoder, opt)
    timings["segment_embed"] = time.perf_counter() - t0

    t1 = time.perf_counter()
    in_plane = [i for i in range(fixed.ndim) if i != axis] if axis is not None else [0, 1]
    sp_f = [fixed.grid.spacing_array[i] for i in in_plane]
    sp_m = [moving.grid.spacing_array[i] for i in in_plane]
    fov = max(n * s for n, s in zip([fixed.grid.shape[i] for i in in_plane], sp_f))
    pairs: list[RoiPair] = []
    for s, (fp, fproto) in enumerate(f_an):
        if len(fp) == 0:
            continue
        lo = max(0, s - opt.slice_range) if axis is not None else 0
        hi = min(len(m_an) - 1, s + opt.slice_range) if axis is not None else 0
        cand = [(s2, i) for s2 in range(lo, hi + 1) for i in range(len(m_an[s2][0]))]
        if not cand:
            continue
        mprotos = torch.cat([m_an[s2][1][i : i + 1] for s2, i in cand])
        mmasks = torch.stack([m_an[s2][0].masks[i] for s2, i in cand])
        sim = similarity_matrix(mprotos, fproto)  # (K_moving, K_fixed)
        # Plausibility gates on position and size (see SamRegOptions).
        shift = torch.cdist(_centroids_mm_2d(mmasks, sp_m), _centroids_mm_2d(fp.masks, sp_f))
        area_m = mmasks.flatten(1).sum(1).float() * float(np.prod(sp_m))
        area_f = fp.masks.flatten(1).sum(1).float() * float(np.prod(sp_f))
        ratio = torch.maximum(area_m[:, None] / area_f[None], area_f[None] / area_m[:, None])
        plausible = (shift <= opt.max_shift_frac * fov) & (ratio <= opt.max_area_ratio)
        sim = torch.where(plausible, sim, torch.zeros_like(sim))
        for match in match_rois(sim, threshold=opt.threshold, mode=opt.matching, top_k=opt.top_k):
            s2, i = cand[match.moving_index]
            pairs.append(
                RoiPair(
                    _lift(fp.masks[match.fixed_index], fixed.grid.shape, axis, s),
                    _lift(m_an[s2][0].masks[i], moving.grid.shape, axis, s2),
                    float(match.similarity),
                    s if axis is not None else None,
                    s2 if axis is not None else None,
                )
            )
    timings["match"] = time.perf_counter() - t1
    log.info("samreg: %d ROI pair(s) matched", len(pairs))
    return pairs


def label_roi_pairs(fixed_labels: Image, moving_labels: Image, values: Sequence[int] | None = None) -> list[RoiPair]:
    """Case 1 of the paper: one pair per label value present in both maps (0 excluded)."""
    if values is None:
        present = [set(np.unique(lab.data.numpy()).tolist()) for lab in (fixed_labels, moving_labels)]
        values = sorted(present[0] & present[1] - {0})
    pairs = []
    for v in values:
        fm, mm = fixed_labels.data == v, moving_labels.data == v
        if fm.any() and mm.any():
            pairs.append(RoiPair(fm, mm, 1.0, source=f"labels:{v}"))
    if not pairs:
        raise FmregError("the label maps share no non-zero label value: nothing to pair")
    return pairs


def fit_pairs(
    fixed: Image, moving: Image, pairs: list[RoiPair], fit_options: FitOptions | None = None
) -> tuple[DisplacementField, dict]:
    """Dense field from ROI pairs (Eq. 10), pair weights = similarity."""
    if pairs:
        fm = torch.stack([p.fixed_mask for p in pairs])
        mm = torch.stack([p.moving_mask for p in pairs])
        w = torch.tensor([p.similarity for p in pairs])
    else:
        fm = torch.zeros((0, *fixed.grid.shape))
        mm = torch.zeros((0, *moving.grid.shape))
        w = None
    sliced = [p.fixed_slice is not None for p in pairs]
    slice_axis = through_plane_axis(fixed.grid) if pairs and all(sliced) else None
    u, report = fit_field(fixed.grid, fm, mm, moving.grid, fit_options, fixed.data, moving.data, w, slice_axis)
    return u, asdict(report)


def samreg(
    fixed: Image,
    moving: Image,
    segmenter: Segmenter,
    encoder: Encoder,
    options: SamRegOptions | None = None,
    fit_options: FitOptions | None = None,
) -> SamRegResult:
    """Training-free registration (Alg. 1 + Eq. 10): ROI pairs, then the dense fit."""
    timings: dict[str, float] = {}
    pairs = find_roi_pairs(fixed, moving, segmenter, encoder, options, timings)
    t = time.perf_counter()
    u, report = fit_pairs(fixed, moving, pairs, fit_options)
    timings["fit"] = time.perf_counter() - t
    return SamRegResult(u, pairs, timings, report)
