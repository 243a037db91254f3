"""What the promptable-model backends (SAM, LiteMedSAM) share.

Both run an image encoder once per slice and a prompt decoder many times on its embedding.
This module holds the parts that do not depend on the model: the slice check, the cache of
slice embeddings, the filters on decoded masks, the last clean-up of the proposals (small
regions, a second NMS), and :class:`PromptableBackend`, which puts them together as a
segmenter and encoder around a model's encoder, prompts and decoder.

Conventions: a slice is ``(H, W)`` in array order (rows, columns); the model input is a
square of ``image_size`` pixels holding the slice resized to ``resized_hw`` at its top-left
corner (see :mod:`fmreg.segment.segment_anything.preprocessing`).
"""

from __future__ import annotations

import hashlib
import logging
import math
from collections import OrderedDict
from typing import Hashable

import torch
from torch import Tensor

from fmreg.errors import FmregError
from fmreg.segment.base import RoiProposals
from fmreg.segment.segment_anything.masks import mask_nms, remove_small_regions, stability_score
from fmreg.segment.segment_anything.preprocessing import postprocess_masks

__all__ = [
    "EmbeddingCache",
    "PromptableBackend",
    "check_slice",
    "clean_proposals",
    "crop_embedding",
    "filter_decoded",
    "merge_candidates",
    "on_device",
]

# Upsampling every mask of a batch to the model input at once takes ``4 * image_size**2``
# bytes per mask (4 MB for SAM's 1024); chunks bound the peak memory whatever the batch.
_UPSAMPLE_CHUNK = 16

log = logging.getLogger(__name__)

#: What the cache keeps per slice: the embedding ``(1, C, E, E)`` and the resized ``(h, w)``.
Entry = tuple[Tensor, tuple[int, int]]


def check_slice(image: Tensor, backend: str) -> Tensor:
    """One slice checked for a model backend.

    Args:
        image: ``(H, W)`` tensor, any intensity range.
        backend: The backend's name for the messages (``"SAM"``, ``"medsam"``).

    Returns:
        The slice as a detached float32 tensor on its device.

    Raises:
        FmregError: Not a 2D tensor, empty, or holding NaN/Inf.
    """
    if not isinstance(image, Tensor) or image.ndim != 2:
        shape = tuple(image.shape) if isinstance(image, Tensor) else type(image).__name__
        raise FmregError(f"the {backend} backend takes one 2D (H, W) slice, got {shape}")
    if min(image.shape) < 1:
        raise FmregError(f"the {backend} backend got an empty slice of shape {tuple(image.shape)}")
    image = image.detach().to(torch.float32)
    if not bool(torch.isfinite(image).all()):
        raise FmregError(f"the slice given to the {backend} backend contains NaN/Inf intensities")
    return image


class EmbeddingCache:
    """The embeddings of the last few slices, keyed on the slice's values and settings.

    SAMReg asks a backend for ``segment`` and ``features`` of the same slice (and, in 3D,
    for the same moving slice from several fixed slices); the encoder is the expensive part,
    so it runs once per distinct slice.

    Args:
        size: Entries kept (least recently used dropped first); 0 disables the cache.
    """

    def __init__(self, size: int) -> None:
        self.size = int(size)
        self._entries: OrderedDict[str, Entry] = OrderedDict()

    @staticmethod
    def key(image: Tensor, *settings: Hashable) -> str:
        """A key for ``image`` (its shape and a hash of its values) under ``settings``."""
        data = image.detach().cpu().contiguous().numpy()
        digest = hashlib.blake2b(data.tobytes(), digest_size=16).hexdigest()
        return f"{tuple(data.shape)}:{settings}:{digest}"

    def get(self, key: str) -> Entry | None:
        hit = self._entries.get(key)
        if hit is not None:
            self._entries.move_to_end(key)
        return hit

    def put(self, key: str, entry: Entry) -> Entry:
        if self.size > 0:
            self._entries[key] = entry
            while len(self._entries) > self.size:
                self._entries.popitem(last=False)
        return entry

    def clear(self) -> None:
        self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)


def crop_embedding(embedding: Tensor, resized_hw: tuple[int, int], image_size: int, device) -> Tensor:
    """The embedding cells that cover the unpadded slice, as encoder features.

    Args:
        embedding: ``(1, C, E, E)`` over the padded square model input.
        resized_hw: ``(h, w)`` of the resized slice inside the input, pixels.
        image_size: Side of the model input, pixels.
        device: Where the features go (the slice's device).

    Returns:
        ``(C, ceil(h / cell), ceil(w / cell))`` float32, ``cell = image_size / E``; the last
        row/column may reach up to one cell past the slice edge.
    """
    cell = image_size / embedding.shape[-1]
    rows, cols = math.ceil(resized_hw[0] / cell), math.ceil(resized_hw[1] / cell)
    return embedding[0, :, :rows, :cols].to(torch.float32).to(device).clone()


def filter_decoded(
    low_res: Tensor,
    iou: Tensor,
    resized_hw: tuple[int, int],
    original_hw: tuple[int, int],
    image_size: int,
    pred_iou_thresh: float,
    stability_thresh: float,
    stability_offset: float,
) -> RoiProposals:
    """Decoder outputs that pass SAM's predicted-IoU and stability filters, on the slice.

    Args:
        low_res: ``(N, h_l, w_l)`` mask logits over the padded model input.
        iou: ``(N,)`` predicted IoU.
        resized_hw: ``(h, w)`` of the resized slice inside the model input.
        original_hw: ``(H, W)`` of the slice.
        image_size: Side of the model input, pixels.
        pred_iou_thresh, stability_thresh: Keep masks at or above both.
        stability_offset: Logit offset of the stability score.

    Returns:
        CPU proposals: masks ``(k, H, W)`` bool (non-empty), scores = predicted IoU,
        stability; in the order of the input.
    """
    low_res, iou = low_res.to(torch.float32), iou.to(torch.float32)
    # The IoU filter needs no upsampling, so it runs first and saves most of the work.
    keep = iou >= pred_iou_thresh
    low_res, iou = low_res[keep], iou[keep]
    masks, ious, stabs = [torch.zeros((0, *original_hw), dtype=torch.bool)], [torch.zeros(0)], [torch.zeros(0)]
    for i in range(0, low_res.shape[0], _UPSAMPLE_CHUNK):
        logits = postprocess_masks(low_res[i : i + _UPSAMPLE_CHUNK], resized_hw, original_hw, image_size)
        stab = stability_score(logits, stability_offset)
        binary = logits > 0
        keep = (stab >= stability_thresh) & binary.flatten(1).any(1)
        masks.append(binary[keep].cpu())
        ious.append(iou[i : i + _UPSAMPLE_CHUNK][keep].cpu())
        stabs.append(stab[keep].cpu())
    return RoiProposals(torch.cat(masks), torch.cat(ious), torch.cat(stabs))


def clean_proposals(props: RoiProposals, min_region_area: int, nms_iou_thresh: float) -> RoiProposals:
    """Fill holes and drop islands below ``min_region_area`` pixels, then NMS again.

    Cleaning can empty a mask or make two masks coincide; SAM's generator likewise re-runs
    NMS after it. ``min_region_area <= 0`` returns ``props`` unchanged.
    """
    if min_region_area <= 0 or not len(props):
        return props
    cleaned = torch.stack([remove_small_regions(m, min_region_area) for m in props.masks])
    props = RoiProposals(cleaned, props.scores, props.stability)
    props = props.select(props.masks.flatten(1).any(1))
    return props.select(mask_nms(props.masks, props.scores, nms_iou_thresh))


def merge_candidates(
    parts: list[RoiProposals], nms_iou_thresh: float, min_region_area: int, what: str
) -> RoiProposals:
    """The filtered candidates of all prompt batches of one slice, after NMS and clean-up.

    Args:
        parts: Per-batch proposals of :func:`filter_decoded` (at least one).
        nms_iou_thresh: Suppress a mask overlapping a better-scored one by more than this IoU.
        min_region_area: See :func:`clean_proposals`.
        what: The backend and prompts, for the debug log line.

    Returns:
        CPU proposals, best predicted IoU first.
    """
    props = RoiProposals(*(torch.cat([getattr(p, f) for p in parts]) for f in ("masks", "scores", "stability")))
    n_candidates = len(props)
    props = props.select(mask_nms(props.masks, props.scores, nms_iou_thresh))
    log.debug("%s: %d masks passed the IoU/stability filters, %d after NMS", what, n_candidates, len(props))
    return clean_proposals(props, min_region_area, nms_iou_thresh)


def on_device(props: RoiProposals, device: torch.device) -> RoiProposals:
    """``props`` on ``device`` with the scores clipped to [0, 1] (predicted IoU may exceed 1)."""
    return RoiProposals(
        props.masks.to(device),
        props.scores.clamp(0.0, 1.0).to(device),
        props.stability.to(device),
    )


class PromptableBackend:
    """A SAM-family model as segmenter and encoder: the parts that do not depend on the model.

    ``embed`` caches a slice's embedding, ``features`` crops it to the slice (the encoder),
    ``segment`` prompts the decoder in batches and keeps the masks that pass the predicted-IoU
    and stability filters and NMS (the segmenter, paper 002, Eq. 4).

    A subclass sets ``model`` (a torch module), ``intensity_window`` (part of the cache key),
    ``_cache`` (an :class:`EmbeddingCache`) and the filter settings (``pred_iou_thresh``,
    ``stability_score_thresh``, ``stability_offset``, ``nms_iou_thresh``,
    ``min_region_area``), names itself and its prompts in ``label`` and ``prompt_kind``, and
    implements ``image_size``, ``batch_size``, :meth:`_encode_slice`, :meth:`_prompts` and
    :meth:`_decode`.
    """

    label = "model"
    prompt_kind = "prompt"
    model: torch.nn.Module
    intensity_window: tuple[float, float]
    _cache: EmbeddingCache
    pred_iou_thresh: float
    stability_score_thresh: float
    stability_offset: float
    nms_iou_thresh: float
    min_region_area: int

    def _set_filters(
        self,
        pred_iou_thresh: float,
        stability_score_thresh: float,
        stability_offset: float,
        nms_iou_thresh: float,
        min_region_area: int,
        intensity_window: tuple[float, float],
        cache_size: int,
    ) -> None:
        """Check and keep the settings every backend has (see the subclasses' arguments)."""
        lo, hi = intensity_window
        if not 0 <= lo < hi <= 100:
            raise FmregError(
                f"intensity_window {tuple(intensity_window)} must be percentiles 0 <= low < high <= 100"
            )
        self.intensity_window = (float(lo), float(hi))
        self.pred_iou_thresh = float(pred_iou_thresh)
        self.stability_score_thresh = float(stability_score_thresh)
        self.stability_offset = float(stability_offset)
        self.nms_iou_thresh = float(nms_iou_thresh)
        self.min_region_area = int(min_region_area)
        self.cache_size = int(cache_size)
        self._cache = EmbeddingCache(self.cache_size)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def image_size(self) -> int:
        """Side of the square model input in pixels."""
        raise NotImplementedError

    def check(self, image: Tensor) -> Tensor:
        """:func:`check_slice` with this backend's name in the messages."""
        return check_slice(image, self.label)

    def embed(self, image: Tensor) -> Entry:
        """The image embedding of a slice, from the cache when the same slice was seen.

        Args:
            image: ``(H, W)`` float slice.

        Returns:
            The embedding ``(1, C, E, E)`` on the model device (it covers the padded square
            input; SAM and LiteMedSAM: ``C = 256``, ``E = 64``) and the ``(h, w)`` of the
            resized, unpadded slice inside the input.
        """
        return self._embed(self.check(image))

    def _embed(self, image: Tensor) -> Entry:
        key = EmbeddingCache.key(image, self.intensity_window)
        hit = self._cache.get(key)
        if hit is not None:
            return hit
        with torch.inference_mode():
            entry = self._encode_slice(image.cpu())
        return self._cache.put(key, entry)

    def _encode_slice(self, image: Tensor) -> Entry:
        """Preprocess a checked CPU slice and run the image encoder: ``(embedding, (h, w))``."""
        raise NotImplementedError

    def clear_cache(self) -> None:
        """Forget cached embeddings (e.g. after changing the model's weights)."""
        self._cache.clear()

    def features(self, image: Tensor) -> Tensor:
        """Dense features for prototypes (paper 002, Eq. 3): the model's image embedding.

        Args:
            image: ``(H, W)`` float slice.

        Returns:
            ``(C, H', W')`` float32 on the slice's device: the embedding cropped to the cells
            that cover the unpadded slice (:func:`crop_embedding`), so it spans the slice's
            field of view (e.g. 64 x 64 for a square slice, 64 x 32 for a 2:1 slice).
        """
        embedding, resized_hw = self.embed(image)
        return crop_embedding(embedding, resized_hw, self.image_size, image.device)

    # ------------------------------------------------------------------ segmenter

    @property
    def batch_size(self) -> int:
        """Prompts decoded together."""
        raise NotImplementedError

    def _prompts(self, image: Tensor, resized_hw: tuple[int, int]) -> Tensor:
        """The everything-mode prompts of a checked slice, ``(N, ...)`` in input pixels."""
        raise NotImplementedError

    def _decode(self, embedding: Tensor, prompts: Tensor) -> tuple[Tensor, Tensor]:
        """Mask logits ``(n, h_l, w_l)`` over the padded input and predicted IoU ``(n,)`` of
        a batch of prompts (``n`` may be a multiple of the batch: several masks a prompt)."""
        raise NotImplementedError

    def _batch_starts(self, n: int):
        """Where each batch of ``n`` prompts starts (a subclass may add a progress bar)."""
        return range(0, n, self.batch_size)

    def segment(self, image: Tensor) -> RoiProposals:
        """Segment everything in one slice (paper 002, Eq. 4).

        Args:
            image: ``(H, W)`` float slice, any intensity range.

        Returns:
            :class:`RoiProposals` on the slice's device: ``masks`` ``(K, H, W)`` bool,
            best-scored first; ``scores`` the predicted IoU clipped to [0, 1];
            ``stability`` the stability score.
        """
        checked = self.check(image)
        original_hw = (int(checked.shape[0]), int(checked.shape[1]))
        embedding, resized_hw = self._embed(checked)
        prompts = self._prompts(checked, resized_hw)
        parts = [RoiProposals.empty(original_hw)]
        for start in self._batch_starts(len(prompts)):
            with torch.inference_mode():
                low_res, iou = self._decode(embedding, prompts[start : start + self.batch_size])
            parts.append(filter_decoded(
                low_res, iou, resized_hw, original_hw, self.image_size,
                self.pred_iou_thresh, self.stability_score_thresh, self.stability_offset,
            ))
        what = f"{self.label} everything mode, {len(prompts)} {self.prompt_kind} prompts"
        props = merge_candidates(parts, self.nms_iou_thresh, self.min_region_area, what)
        return on_device(props, image.device)
