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

import hashlib
import logging
import os
from collections import OrderedDict
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor

from fmreg.errors import FmregError
from fmreg.segment.base import RoiProposals
from fmreg.segment.segment_anything.checkpoint import load_sam_model
from fmreg.segment.segment_anything.masks import (
    mask_nms,
    point_grid,
    remove_small_regions,
    stability_score,
)
from fmreg.segment.segment_anything.preprocessing import (
    INTENSITY_WINDOW,
    postprocess_masks,
    preprocess,
)

if TYPE_CHECKING:  # pragma: no cover - typing only
    from transformers import SamModel

__all__ = ["SAM_PRED_IOU_THRESH", "SAM_STABILITY_THRESH", "SamBackend"]

log = logging.getLogger(__name__)

# The defaults of SAM's own automatic mask generator; SAMReg overrides both with the paper's
# 0.90 (fmreg.segment.filtering.MIN_SCORE and MIN_STABILITY).
SAM_PRED_IOU_THRESH = 0.88
SAM_STABILITY_THRESH = 0.95

# Upsampling every mask of a batch to the 1024² model input at once takes ~4 MB per mask;
# chunks bound the peak memory independently of points_per_batch.
_UPSAMPLE_CHUNK = 16


class SamBackend:
    """SAM as both a :class:`~fmreg.segment.base.Segmenter` and an
    :class:`~fmreg.segment.base.Encoder`.

    The image embedding of the last few slices is cached (keyed on the slice's values), so
    ``segment`` and ``features`` on the same slice run the expensive ViT encoder once.

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
        lo, hi = intensity_window
        if not 0 <= lo < hi <= 100:
            raise FmregError(
                f"intensity_window {intensity_window} must be percentiles 0 <= low < high <= 100"
            )
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
        self.pred_iou_thresh = float(pred_iou_thresh)
        self.stability_score_thresh = float(stability_score_thresh)
        self.stability_offset = float(stability_offset)
        self.nms_iou_thresh = float(nms_iou_thresh)
        self.min_region_area = int(min_region_area)
        self.intensity_window = (float(lo), float(hi))
        self.cache_size = int(cache_size)
        self.progress = progress
        self._cache: OrderedDict[str, tuple[Tensor, tuple[int, int]]] = OrderedDict()

    # ------------------------------------------------------------------ model facts

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def image_size(self) -> int:
        """Side of the square model input in pixels (1024 for SAM)."""
        return int(self.model.config.vision_config.image_size)

    # ------------------------------------------------------------------ encoder

    def _check(self, image: Tensor) -> Tensor:
        if not isinstance(image, Tensor) or image.ndim != 2:
            shape = tuple(image.shape) if isinstance(image, Tensor) else type(image).__name__
            raise FmregError(f"the SAM backend takes one 2D (H, W) slice, got {shape}")
        if min(image.shape) < 1:
            raise FmregError(f"the SAM backend got an empty slice of shape {tuple(image.shape)}")
        image = image.detach().to(torch.float32)
        if not bool(torch.isfinite(image).all()):
            raise FmregError("the slice given to the SAM backend contains NaN/Inf intensities")
        return image

    def embed(self, image: Tensor) -> tuple[Tensor, tuple[int, int]]:
        """Image embedding of a slice, from the cache when the same slice was seen.

        Args:
            image: ``(H, W)`` float slice.

        Returns:
            The embedding ``(1, C, E, E)`` on the model device (``C = 256``, ``E = 64`` for
            SAM; it covers the padded square input) and the ``(h, w)`` of the resized,
            unpadded image inside the input.
        """
        return self._embed(self._check(image))

    def _embed(self, image: Tensor) -> tuple[Tensor, tuple[int, int]]:
        key = self._key(image)
        hit = self._cache.get(key)
        if hit is not None:
            self._cache.move_to_end(key)
            return hit
        pixels, resized_hw = preprocess(image.cpu(), self.image_size, self.intensity_window)
        dtype = next(self.model.parameters()).dtype
        with torch.inference_mode():
            embedding = self.model.get_image_embeddings(pixels.to(self.device, dtype))
        entry = (embedding, resized_hw)
        if self.cache_size > 0:
            self._cache[key] = entry
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        return entry

    def _key(self, image: Tensor) -> str:
        data = image.cpu().contiguous().numpy()
        digest = hashlib.blake2b(data.tobytes(), digest_size=16).hexdigest()
        return f"{tuple(data.shape)}:{self.intensity_window}:{digest}"

    def clear_cache(self) -> None:
        """Forget cached embeddings (e.g. after changing the model's weights)."""
        self._cache.clear()

    def features(self, image: Tensor) -> Tensor:
        """Dense features for prototypes (paper 002, Eq. 3): SAM's image embedding.

        Args:
            image: ``(H, W)`` float slice.

        Returns:
            ``(C, H', W')`` float32 on the slice's device (``C = 256`` for SAM). The
            embedding is cropped to the cells that cover the unpadded image, so it spans the
            slice's field of view; ``H' = ceil(h / 16)`` where ``h`` is the resized height
            (e.g. 64 x 64 for a square slice, 64 x 32 for a 2:1 slice). The last row/column
            may reach up to one cell past the slice edge.
        """
        embedding, (h, w) = self.embed(image)
        cell = self.image_size / embedding.shape[-1]
        rows, cols = int(np.ceil(h / cell)), int(np.ceil(w / cell))
        return embedding[0, :, :rows, :cols].to(torch.float32).to(image.device).clone()

    # ------------------------------------------------------------------ segmenter

    def segment(self, image: Tensor) -> RoiProposals:
        """Segment everything in one slice (paper 002, Eq. 4).

        Args:
            image: ``(H, W)`` float slice, any intensity range.

        Returns:
            :class:`RoiProposals` on the slice's device: ``masks`` ``(K, H, W)`` bool,
            best-scored first; ``scores`` the predicted IoU clipped to [0, 1];
            ``stability`` the stability score.
        """
        image_c = self._check(image)
        original_hw = (int(image_c.shape[0]), int(image_c.shape[1]))
        embedding, resized_hw = self._embed(image_c)

        # Prompts in the resized input's pixel frame, where the prompt encoder expects them.
        grid = point_grid(self.points_per_side)
        points = grid * torch.tensor([resized_hw[1], resized_hw[0]], dtype=torch.float32)

        masks: list[Tensor] = []
        scores: list[Tensor] = []
        stabilities: list[Tensor] = []
        starts = range(0, len(points), self.points_per_batch)
        for start in self._progress(starts):
            batch = points[start : start + self.points_per_batch]
            m, s, st = self._decode_batch(embedding, batch, resized_hw, original_hw)
            masks.append(m)
            scores.append(s)
            stabilities.append(st)

        if not masks or sum(len(s) for s in scores) == 0:
            return _empty(original_hw, image.device)
        props = RoiProposals(torch.cat(masks), torch.cat(scores), torch.cat(stabilities))
        n_candidates = len(props)
        props = props.select(mask_nms(props.masks, props.scores, self.nms_iou_thresh))
        log.debug(
            "SAM everything mode: %d prompts, %d masks passed the IoU/stability filters, "
            "%d after NMS",
            len(points),
            n_candidates,
            len(props),
        )

        if self.min_region_area > 0 and len(props):
            cleaned = torch.stack(
                [remove_small_regions(m, self.min_region_area) for m in props.masks]
            )
            props = RoiProposals(cleaned, props.scores, props.stability)
            props = props.select(props.masks.flatten(1).any(1))
            # Cleaning can make two masks coincide; SAM likewise re-runs NMS here.
            props = props.select(mask_nms(props.masks, props.scores, self.nms_iou_thresh))

        return RoiProposals(
            props.masks.to(image.device),
            props.scores.clamp(0.0, 1.0).to(image.device),
            props.stability.to(image.device),
        )

    def _progress(self, starts: range):
        # A bar only pays off when decoding takes a while (real SAM: ~1 s per batch on CPU).
        if not self.progress or len(starts) < 8:
            return starts
        from tqdm.auto import tqdm

        return tqdm(starts, desc="SAM everything mode", unit="batch", leave=False)

    def _decode_batch(
        self,
        embedding: Tensor,
        points: Tensor,
        resized_hw: tuple[int, int],
        original_hw: tuple[int, int],
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Decode one batch of point prompts into filtered masks on the original slice.

        Args:
            embedding: ``(1, C, E, E)`` image embedding.
            points: ``(B, 2)`` ``(x, y)`` prompts in resized-input pixels.

        Returns:
            CPU tensors: masks ``(k, H, W)`` bool, predicted IoU ``(k,)``, stability ``(k,)``.
        """
        n = points.shape[0]
        input_points = points.view(1, n, 1, 2).to(self.device, embedding.dtype)
        input_labels = torch.ones((1, n, 1), dtype=torch.int64, device=self.device)
        with torch.inference_mode():
            out = self.model(
                image_embeddings=embedding,
                input_points=input_points,
                input_labels=input_labels,
                multimask_output=True,
            )
        # All three multimask outputs per prompt are candidates (whole, part, sub-part).
        low_res = out.pred_masks[0].flatten(0, 1).to(torch.float32)  # (3n, h_l, w_l)
        iou = out.iou_scores[0].flatten().to(torch.float32)  # (3n,)

        # The IoU filter needs no upsampling, so it runs first and saves most of the work.
        keep = iou >= self.pred_iou_thresh
        low_res, iou = low_res[keep], iou[keep]

        masks, ious, stabs = [], [], []
        for i in range(0, low_res.shape[0], _UPSAMPLE_CHUNK):
            chunk = low_res[i : i + _UPSAMPLE_CHUNK]
            logits = postprocess_masks(chunk, resized_hw, original_hw, self.image_size)
            stab = stability_score(logits, self.stability_offset)
            binary = logits > 0
            keep = (stab >= self.stability_score_thresh) & binary.flatten(1).any(1)
            masks.append(binary[keep].cpu())
            ious.append(iou[i : i + _UPSAMPLE_CHUNK][keep].cpu())
            stabs.append(stab[keep].cpu())
        if not masks:
            return (
                torch.zeros((0, *original_hw), dtype=torch.bool),
                torch.zeros(0),
                torch.zeros(0),
            )
        return torch.cat(masks), torch.cat(ious), torch.cat(stabs)


def _empty(shape: tuple[int, int], device: torch.device) -> RoiProposals:
    props = RoiProposals.empty(shape)
    return RoiProposals(props.masks.to(device), props.scores.to(device), props.stability.to(device))
