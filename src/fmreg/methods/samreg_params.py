"""The declared parameters of the SAMReg methods (``samreg``, ``samreg-sam``, ``samreg-medsam``,
``samreg-labels``).

Types and defaults come from the dataclasses that use them (:class:`SamRegOptions` for the ROI
stage, :class:`FitOptions` for the dense fit) and from the signatures of :class:`SamBackend`
(the ``sam_<option>`` parameters) and :class:`LiteMedSamBackend` (``medsam_<option>``); the
tables here add each one's range and help line, which
``fmreg methods samreg`` prints. A field added to one of those without an entry here fails
at import (see :func:`fmreg.methods.params.declare`).
"""

from __future__ import annotations

from fmreg.correspond.pairs import SamRegOptions
from fmreg.methods.params import declare
from fmreg.optimize.fit import FitOptions
from fmreg.segment.medsam.backend import LiteMedSamBackend
from fmreg.segment.segment_anything.backend import SamBackend

__all__ = ["FIT_PARAMS", "MEDSAM_BACKEND_PARAMS", "ROI_PARAMS", "SAM_BACKEND_PARAMS"]

#: The ROI stage: proposals, prototypes, matching (paper 002, Sec. 3 and 4.2).
ROI_PARAMS = declare(SamRegOptions, {
    "min_area_frac": ("[0, 1]", "smallest ROI, as a fraction of the slice area"),
    "max_area_frac": ("[0, 1]", "largest ROI, as a fraction of the slice area"),
    "max_overlap": ("[0, 1]", "overlap above which the lower-scoring of two ROIs is dropped"),
    "min_score": ("[0, 1]", "ROI score threshold (null: the segmenter's own, else 0.90)"),
    "min_stability": ("[0, 1]", "ROI stability threshold (null: the segmenter's own, else 0.90)"),
    "threshold": ("[0, 1]", "cosine similarity a ROI pair must reach (epsilon)"),
    "matching": (("greedy", "optimal", "one_to_many"), "how prototypes are paired"),
    "top_k": (">= 0", "keep the K most similar pairs per slice (null: all)"),
    "slice_range": (">= 0", "3D: moving slices searched on each side of a fixed slice"),
    "max_shift_frac": (">= 0", "drop pairs whose centroids are further apart than this fraction of the view"),
    "max_area_ratio": (">= 1", "drop pairs whose areas differ by more than this factor"),
    "keep_border_regions": (None, "keep ROIs cut out by the image border or lying outside the imaged object"),
    "global_transform": (None, "start from the in-plane similarity most ROI candidates agree with"),
    "global_top_k": (">= 1", "candidates per fixed ROI in the global search"),
    "global_agreement": ("[0, 1]", "moment-ellipse overlap a candidate needs to agree with a global hypothesis"),
    "global_min_area_frac": ("[0, 1]", "smallest ROI of the global search, fraction of the slice area"),
    "pair_source": (("matched", "consensus"), "fit pairs: prototype matches, or the candidates agreeing with the global transform"),
    "redraw_masks": (None, "redraw the pairs after the global transform as one kind of iso-intensity region in both images"),
})

#: The dense fit (stationary velocity, multi-resolution; paper 002, Eq. 10).
FIT_PARAMS = declare(FitOptions, {
    "levels": (">= 1", "pyramid levels (in-plane factor 2 each)"),
    "iterations": (">= 0", "Adam steps per level, coarsest first (one value, or one per level)"),
    "lr": ("> 0", "Adam step size, mm of velocity"),
    "control_spacing": ("> 0", "spacing of the velocity control grid, mm"),
    "reg_weight": (">= 0", "weight of the velocity smoothness term (lambda)"),
    "mse_weight": (">= 0", "weight of the ROI MSE term"),
    "dice_weight": (">= 0", "weight of the ROI Dice term"),
    "image_weight": (">= 0", "weight of the image term (0: ROI pairs only)"),
    "image_metric": (("auto", "mse", "lncc", "mind"), "image term: mse (one contrast), lncc (local correlation), mind (MSE of MIND-SSC descriptors: any contrast), auto (mind when the images anti-correlate under the start, else mse)"),
    "centroid_weight": (">= 0", "weight of the ROI centroid term"),
    "lncc_window_mm": ("> 0", "LNCC window edge, mm"),
    "squaring_steps": (">= 0", "most scaling-and-squaring steps (fewer for a small velocity)"),
    "verify_dice": ("[0, 1]", "drop ROI pairs whose Dice under the image-only fit is below this (null: keep all)"),
    "affine_iterations": (">= 0", "steps of an affine stage before the deformable ones (0: off)"),
    "affine_lr": ("> 0", "Adam step size of the affine stage"),
    "affine_metric": (("mse", "lncc", "mind"), "image term of the affine stage (null: image_metric; mind whenever image_metric is)"),
    "match_histogram": (None, "map the moving intensities onto the fixed histogram first"),
    "refine_iterations": (">= 0", "steps of the refinement with the verified pairs"),
    "max_fit_voxels": (">= 1", "levels with more voxels than this are not optimised"),
    "initialize": (("moments", "identity"), "start from a moments-based affine, or the identity"),
    "fine_control_spacing": ("> 0", "control spacing of the finest optimised level, mm (null: control_spacing)"),
    "pyramid_sigma": (">= 0", "anti-aliasing of the coarser levels, level voxels"),
    "fine_image_weight": (">= 0", "image weight of the finest optimised level (null: image_weight)"),
    "fine_min_correlation": (">= -1", "image correlation the fine settings need (null: always; above 1: never)"),
})

#: The filters and resources every SAM-family backend has (SAM, LiteMedSAM).
_MODEL_BACKEND = {
    "pred_iou_thresh": ("[0, 1]", "keep masks whose predicted IoU is at least this"),
    "stability_score_thresh": ("[0, 1]", "keep masks whose stability score is at least this"),
    "stability_offset": (">= 0", "logit offset of the stability score"),
    "nms_iou_thresh": ("[0, 1]", "suppress masks overlapping a better one by more than this IoU"),
    "min_region_area": (">= 0", "fill holes and drop islands smaller than this, pixels (0: off)"),
    "device": (None, "torch device of the model (null: CPU)"),
    "cache_size": (">= 0", "slice embeddings kept in memory"),
}

#: ``sam_<option>``: the Segment Anything backend, when a segmenter or encoder is ``sam``.
SAM_BACKEND_PARAMS = declare(SamBackend, {
    "points_per_side": (">= 1", "prompts per side of SAM's point grid"),
    "points_per_batch": (">= 1", "prompts decoded together (speed against memory)"),
    "intensity_window": ("[0, 100]", "intensity percentiles mapped to 0 and 255 before the model"),
    "progress": (None, "progress bar when there are many prompt batches"),
    **_MODEL_BACKEND,
}, prefix="sam_")

#: ``medsam_<option>``: the LiteMedSAM backend, when a segmenter or encoder is ``medsam``. Its
#: ``model`` argument is the method's own ``model`` parameter, so it is not declared again.
MEDSAM_BACKEND_PARAMS = tuple(p for p in declare(LiteMedSamBackend, {
    "model": (None, "(the method's model parameter)"),
    "box_sizes": ("(0, 1]", "box sides of the prompt grid, fractions of the slice's longest side ([]: no grid)"),
    "box_overlap": ("[0, 1)", "fraction of a box side shared by neighbouring grid boxes"),
    "classical_boxes": (">= 0", "also prompt with the boxes of this many classical proposals (0: off)"),
    "box_margin": (">= 0", "widen each classical box by this fraction of its side at both ends"),
    "box_dedupe_iou": ("[0, 1]", "skip a classical box overlapping a chosen one by more than this box IoU"),
    "boxes_per_batch": (">= 1", "boxes decoded together (speed against memory)"),
    "intensity_window": ("[0, 100]", "intensity percentiles mapped to 0 and 1 before the model"),
    **_MODEL_BACKEND,
}, prefix="medsam_") if p.name != "medsam_model")
