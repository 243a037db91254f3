"""Segment Anything (SAM, MedSAM, SlimSAM) as a SAMReg segmenter and encoder.

* :mod:`.checkpoint`: :func:`load_sam_model`, a Hugging Face ``SamModel`` from a local
  folder or a hub id, with one-line errors for every unusable checkpoint;
* :mod:`.preprocessing`: slice to model input and decoder masks back to the slice;
* :mod:`.masks`: the automatic mask generator's prompt grid, stability score and NMS;
* :mod:`.backend`: :class:`SamBackend`, the segmenter and encoder built from them.
"""

from fmreg.segment.segment_anything.backend import (
    SAM_PRED_IOU_THRESH,
    SAM_STABILITY_THRESH,
    SamBackend,
)
from fmreg.segment.segment_anything.checkpoint import DEFAULT_HUB_ID, load_sam_model
from fmreg.segment.segment_anything.masks import (
    mask_boxes,
    mask_iou_matrix,
    mask_nms,
    point_grid,
    remove_small_regions,
    stability_score,
)
from fmreg.segment.segment_anything.preprocessing import (
    INTENSITY_WINDOW,
    PIXEL_MEAN,
    PIXEL_STD,
    intensity_to_rgb255,
    pad_bottom_right,
    postprocess_masks,
    preprocess,
    resize_longest_side,
    resized_shape,
)

__all__ = [
    "DEFAULT_HUB_ID",
    "INTENSITY_WINDOW",
    "PIXEL_MEAN",
    "PIXEL_STD",
    "SAM_PRED_IOU_THRESH",
    "SAM_STABILITY_THRESH",
    "SamBackend",
    "intensity_to_rgb255",
    "load_sam_model",
    "mask_boxes",
    "mask_iou_matrix",
    "mask_nms",
    "pad_bottom_right",
    "point_grid",
    "postprocess_masks",
    "preprocess",
    "remove_small_regions",
    "resize_longest_side",
    "resized_shape",
    "stability_score",
]
