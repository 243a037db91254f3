"""LiteMedSAM as a SAMReg segmenter and encoder (paper 002, Sec. 3.2, with MedSAM's model).

The TinyViT image encoder gives the dense features ``F = E(I)`` (Eq. 3): a 256 x 64 x 64
embedding of the 256-pixel input. Everything mode (Eq. 4) prompts the decoder with boxes
(:mod:`.prompts`): a multi-scale grid and, optionally, the boxes of the classical
segmenter's proposals, all decoded in batches against the one embedding of the slice; then
SAM's predicted-IoU and stability filters and NMS by mask IoU, shared with
:class:`~fmreg.segment.segment_anything.SamBackend` through
:class:`~fmreg.segment.promptable.PromptableBackend`.

Conventions: a slice is ``(H, W)`` in array order (rows, columns); boxes are ``(x0, y0, x1,
y1)`` in pixels of the 256 x 256 model input.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import torch
from torch import Tensor

from fmreg.errors import FmregError
from fmreg.segment.filtering import MAX_AREA_FRAC, MIN_AREA_FRAC, MIN_SCORE, MIN_STABILITY, mask_areas
from fmreg.segment.medsam.model import LiteMedSam, load_lite_medsam
from fmreg.segment.medsam.prompts import distinct_boxes, grid_boxes, mask_prompt_boxes, preprocess
from fmreg.segment.promptable import PromptableBackend
from fmreg.segment.segment_anything.preprocessing import INTENSITY_WINDOW

__all__ = ["BOX_OVERLAP", "BOX_SIZES", "CLASSICAL_BOXES", "LiteMedSamBackend"]

# Everything-mode prompts, chosen by measurement on six real slices (the 2D cardiac, prostate,
# lung, abdomen and brain pairs and ACDC 068 slice 3): with the paper's 0.90 thresholds no
# grid (box sides 0.125 to 0.5 of the slice, overlaps 0 and 0.5, up to 205 boxes) gave an ROI
# of a labelled structure that the classical boxes did not, except at 97-160 boxes (8-14 s a
# slice); a grid box rarely frames one object, and LiteMedSAM then predicts a low IoU. The
# classical proposals' boxes do frame objects (ACDC LV: IoU 0.95, predicted 0.95), and the
# best 8 distinct ones found what the best 16 found. Each box costs ~50 ms of decoding on two
# CPU cores, so the defaults keep ~17 boxes: the 0.5 grid (9 boxes, the one that gave a
# prostate ROI at 0.8 thresholds) and 8 classical boxes.
#: Box sides of the prompt grid, fractions of the slice's longest side.
BOX_SIZES = (0.5,)
#: Neighbouring grid boxes share half their side.
BOX_OVERLAP = 0.5
#: Distinct boxes of the best-scored classical proposals added to the grid.
CLASSICAL_BOXES = 8


class LiteMedSamBackend(PromptableBackend):
    """LiteMedSAM as both a :class:`~fmreg.segment.base.Segmenter` and an
    :class:`~fmreg.segment.base.Encoder`.

    The embedding of the last few slices is cached (keyed on the slice's values), so
    ``segment`` and ``features`` on the same slice run the encoder once
    (:class:`~fmreg.segment.promptable.PromptableBackend`); ``features`` is the 256 x 64 x 64
    embedding cropped to the slice.

    Args:
        model: A ``lite_medsam.pth`` state dict file, an already built :class:`LiteMedSam`,
            or None for the released weights (the ``medsam`` extra).
        box_sizes: Box sides of the prompt grid, fractions of the slice's longest side
            (empty: no grid).
        box_overlap: Fraction of a box side shared by neighbouring grid boxes, in [0, 1).
        classical_boxes: Also prompt with the boxes of this many best-scored proposals of
            the classical segmenter (0: off).
        box_margin: Widen each classical box by this fraction of its side at both ends.
        box_dedupe_iou: A classical box overlapping an already chosen one by more than this
            box IoU is skipped (near-duplicates give the same mask).
        boxes_per_batch: Boxes decoded together; memory grows with it (~25 MB per box).
        pred_iou_thresh: Keep masks whose predicted IoU is >= this (paper 0.90).
        stability_score_thresh: Keep masks whose stability score is >= this (paper 0.90).
        stability_offset: Logit offset of the stability score.
        nms_iou_thresh: Suppress masks overlapping a better one with mask IoU above this.
        min_region_area: If > 0, fill holes and remove islands smaller than this many pixels
            of the original slice from each kept mask.
        intensity_window: Percentiles mapped to 0 and 1 before the model.
        device: Torch device of the model; None: the CPU (an already built model stays
            where it is).
        cache_size: Number of slice embeddings kept.
    """

    name = "medsam"
    label = "medsam"

    def __init__(
        self,
        model: "str | Path | LiteMedSam | None" = None,
        box_sizes: Sequence[float] = BOX_SIZES,
        box_overlap: float = BOX_OVERLAP,
        classical_boxes: int = CLASSICAL_BOXES,
        box_margin: float = 0.05,
        box_dedupe_iou: float = 0.8,
        boxes_per_batch: int = 16,
        pred_iou_thresh: float = MIN_SCORE,
        stability_score_thresh: float = MIN_STABILITY,
        stability_offset: float = 1.0,
        nms_iou_thresh: float = 0.7,
        min_region_area: int = 0,
        intensity_window: tuple[float, float] = INTENSITY_WINDOW,
        device: str | torch.device | None = None,
        cache_size: int = 8,
    ) -> None:
        self._check_options(box_sizes, box_overlap, classical_boxes, boxes_per_batch)
        self._set_filters(pred_iou_thresh, stability_score_thresh, stability_offset, nms_iou_thresh,
                          min_region_area, intensity_window, cache_size)
        if model is None or isinstance(model, (str, os.PathLike)):
            self.model = load_lite_medsam(model, "cpu" if device is None else device)
        elif isinstance(model, LiteMedSam):
            self.model = (model if device is None else model.to(device)).eval()
        else:
            raise FmregError(
                f"the medsam model must be a lite_medsam.pth path or a LiteMedSam, got {type(model).__name__}"
            )
        self.box_sizes = tuple(float(s) for s in box_sizes)
        self.box_overlap = float(box_overlap)
        self.classical_boxes = int(classical_boxes)
        self.box_margin = float(box_margin)
        self.box_dedupe_iou = float(box_dedupe_iou)
        self.boxes_per_batch = int(boxes_per_batch)
        self._classical = None  # built on first use: only everything mode with classical boxes needs it

    @staticmethod
    def _check_options(box_sizes, box_overlap, classical_boxes, boxes_per_batch) -> None:
        if not all(0 < float(s) <= 1 for s in box_sizes):
            raise FmregError(f"box_sizes {list(box_sizes)} must be fractions in (0, 1] of the slice side")
        if not 0 <= box_overlap < 1:
            raise FmregError(f"box_overlap ({box_overlap}) must be in [0, 1)")
        if classical_boxes < 0 or boxes_per_batch < 1:
            raise FmregError(
                f"classical_boxes ({classical_boxes}) must be >= 0 and boxes_per_batch ({boxes_per_batch}) >= 1"
            )
        if not box_sizes and classical_boxes == 0:
            raise FmregError("the medsam backend needs box prompts: give box_sizes or classical_boxes > 0")

    # ------------------------------------------------------------------ encoder

    @property
    def image_size(self) -> int:
        """Side of the square model input in pixels (256)."""
        return self.model.image_size

    def _encode_slice(self, image: Tensor) -> tuple[Tensor, tuple[int, int]]:
        pixels, resized_hw = preprocess(image, self.image_size, self.intensity_window)
        return self.model.encode(pixels.to(self.device)), resized_hw

    # ------------------------------------------------------------------ segmenter

    prompt_kind = "box"

    @property
    def batch_size(self) -> int:
        return self.boxes_per_batch

    def _prompts(self, image: Tensor, resized_hw: tuple[int, int]) -> Tensor:
        return self.prompt_boxes(image, resized_hw)

    def prompt_boxes(self, image: Tensor, resized_hw: tuple[int, int]) -> Tensor:
        """The box prompts of everything mode for one checked slice.

        Returns:
            ``(N, 4)`` float32 ``(x0, y0, x1, y1)`` in model-input pixels: the grid boxes,
            then the classical proposals' boxes.
        """
        boxes = [grid_boxes(resized_hw, self.box_sizes, self.box_overlap)]
        if self.classical_boxes > 0:
            if self._classical is None:
                from fmreg.segment.classical import ClassicalSegmenter

                self._classical = ClassicalSegmenter()
            props = self._classical.segment(image.cpu())  # sorted best score first
            area = mask_areas(props.masks).double() / image.numel()  # fraction of the slice
            # Regions outside SAMReg's ROI size range would only give ROIs its filter drops.
            props = props.select((area >= MIN_AREA_FRAC) & (area <= MAX_AREA_FRAC))
            candidates = mask_prompt_boxes(props.masks, resized_hw, self.box_margin)
            boxes.append(distinct_boxes(candidates, self.box_dedupe_iou, self.classical_boxes))
        return torch.cat(boxes)

    def _decode(self, embedding: Tensor, boxes: Tensor) -> tuple[Tensor, Tensor]:
        return self.model.decode_boxes(embedding, boxes.to(self.device))
