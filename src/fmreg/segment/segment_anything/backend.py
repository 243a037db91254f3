"""Segment Anything as a SAMReg segmenter and encoder (paper 002, Sec. 3.2 and 4.2).

The image encoder gives the dense features ``F = E(I)`` (Eq. 3) and the mask decoder in
"everything" mode gives the candidate ROIs ``{M_k} = D(F)`` (Eq. 4). Everything mode
follows SAM's automatic mask generator: a regular grid of single-point prompts, three masks
per point, filtering by predicted IoU and stability score, then non-maximum suppression
(here by mask IoU rather than box IoU).

Conventions: a slice is ``(H, W)`` in array order (rows, columns); SAM's point prompts are
``(x, y)`` = (column, row) in pixels of the resized model input.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from fmreg.errors import FmregError
from fmreg.segment.promptable import PromptableBackend
from fmreg.segment.segment_anything.checkpoint import load_sam_model
from fmreg.segment.segment_anything.masks import point_grid
from fmreg.segment.segment_anything.preprocessing import INTENSITY_WINDOW, preprocess

if TYPE_CHECKING:  # pragma: no cover - typing only
    from transformers import SamModel

__all__ = ["SAM_PRED_IOU_THRESH", "SAM_STABILITY_THRESH", "SamBackend"]

# The defaults of SAM's own automatic mask generator; SAMReg overrides both with the paper's
# 0.90 (fmreg.segment.filtering.MIN_SCORE and MIN_STABILITY).
SAM_PRED_IOU_THRESH = 0.88
SAM_STABILITY_THRESH = 0.95


class SamBackend(PromptableBackend):
    """SAM as both a :class:`~fmreg.segment.base.Segmenter` and an
    :class:`~fmreg.segment.base.Encoder`.

    The image embedding of the last few slices is cached (keyed on the slice's values), so
    ``segment`` and ``features`` on the same slice run the expensive ViT encoder once
    (:class:`~fmreg.segment.promptable.PromptableBackend`).

    Args:
        model: Local HF model folder, hub id, or an already built ``SamModel``.
        points_per_side: Prompts per side of the regular grid (``points_per_side**2`` prompts).
        points_per_batch: Prompts decoded together; higher is faster but uses
            ``points_per_batch * C * 64 * 64`` floats of decoder activations.
        pred_iou_thresh: Keep masks whose predicted IoU is >= this (SAM 0.88, paper 0.90).
        stability_score_thresh: Keep masks whose stability score is >= this (SAM 0.95,
            paper 0.90).
        stability_offset: Logit offset of the stability score.
        nms_iou_thresh: Suppress masks overlapping a better one with mask IoU above this.
        min_region_area: If > 0, fill holes and remove islands smaller than this many pixels
            of the original slice from each kept mask (SAM's ``min_mask_region_area``).
        intensity_window: Percentiles mapped to 0 and 255 before the model.
        device: Torch device of the model; ``None`` loads onto the CPU and leaves an
            already built model where it is.
        cache_size: Number of slice embeddings kept.
        progress: Show a progress bar when there are many prompt batches.
    """

    name = "sam"
    label = "SAM"

    def __init__(
        self,
        model: "str | Path | SamModel",
        points_per_side: int = 32,
        points_per_batch: int = 64,
        pred_iou_thresh: float = SAM_PRED_IOU_THRESH,
        stability_score_thresh: float = SAM_STABILITY_THRESH,
        stability_offset: float = 1.0,
        nms_iou_thresh: float = 0.7,
        min_region_area: int = 0,
        intensity_window: tuple[float, float] = INTENSITY_WINDOW,
        device: str | torch.device | None = None,
        cache_size: int = 8,
        progress: bool = True,
    ) -> None:
        if points_per_side < 1 or points_per_batch < 1:
            raise FmregError(
                f"points_per_side ({points_per_side}) and points_per_batch ({points_per_batch}) "
                "must be at least 1"
            )
        self._set_filters(pred_iou_thresh, stability_score_thresh, stability_offset, nms_iou_thresh,
                          min_region_area, intensity_window, cache_size)
        if isinstance(model, (str, os.PathLike)):
            self.model = load_sam_model(model, "cpu" if device is None else device)
        elif hasattr(model, "get_image_embeddings") and hasattr(model, "config"):
            self.model = (model if device is None else model.to(device)).eval()
        else:
            raise FmregError(
                "SAM model must be a folder, a hub id or a transformers SamModel, got "
                f"{type(model).__name__}"
            )
        self.points_per_side = int(points_per_side)
        self.points_per_batch = int(points_per_batch)
        self.progress = progress

    # ------------------------------------------------------------------ encoder

    @property
    def image_size(self) -> int:
        """Side of the square model input in pixels (1024 for SAM)."""
        return int(self.model.config.vision_config.image_size)

    def _encode_slice(self, image: Tensor) -> tuple[Tensor, tuple[int, int]]:
        pixels, resized_hw = preprocess(image, self.image_size, self.intensity_window)
        dtype = next(self.model.parameters()).dtype
        return self.model.get_image_embeddings(pixels.to(self.device, dtype)), resized_hw

    # ------------------------------------------------------------------ segmenter

    prompt_kind = "point"

    @property
    def batch_size(self) -> int:
        return self.points_per_batch

    def _prompts(self, image: Tensor, resized_hw: tuple[int, int]) -> Tensor:
        # A regular grid in the resized input's pixel frame, where the prompt encoder expects it.
        grid = point_grid(self.points_per_side)
        return grid * torch.tensor([resized_hw[1], resized_hw[0]], dtype=torch.float32)

    def _batch_starts(self, n: int):
        starts = super()._batch_starts(n)
        # A bar only pays off when decoding takes a while (real SAM: ~1 s per batch on CPU).
        if not self.progress or len(starts) < 8:
            return starts
        from tqdm.auto import tqdm

        return tqdm(starts, desc="SAM everything mode", unit="batch", leave=False)

    def _decode(self, embedding: Tensor, points: Tensor) -> tuple[Tensor, Tensor]:
        """Decode one batch of point prompts.

        Args:
            embedding: ``(1, C, E, E)`` image embedding.
            points: ``(B, 2)`` ``(x, y)`` prompts in resized-input pixels.

        Returns:
            Mask logits ``(3B, h_l, w_l)`` and predicted IoU ``(3B,)``: all three multimask
            outputs of each prompt are candidates (whole, part, sub-part).
        """
        n = points.shape[0]
        input_points = points.view(1, n, 1, 2).to(self.device, embedding.dtype)
        input_labels = torch.ones((1, n, 1), dtype=torch.int64, device=self.device)
        out = self.model(
            image_embeddings=embedding,
            input_points=input_points,
            input_labels=input_labels,
            multimask_output=True,
        )
        return out.pred_masks[0].flatten(0, 1), out.iou_scores[0].flatten()
