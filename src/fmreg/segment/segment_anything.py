"""Segment Anything (SAM, MedSAM, SlimSAM) as a SAMReg segmenter and encoder.

The model is Hugging Face ``transformers``' :class:`~transformers.SamModel`, loaded from a
local folder in HF format (``config.json`` + weights) or, with internet, from a hub id such
as ``facebook/sam-vit-base``. Pre- and post-processing are done here rather than with
``SamProcessor``, whose image processor needs torchvision in transformers 5.

Paper 002, Sec. 3.2 and 4.2: the image encoder gives the dense features ``F = E(I)``
(Eq. 3) and the mask decoder in "everything" mode gives the candidate ROIs
``{M_k} = D(F)`` (Eq. 4). Everything mode follows SAM's automatic mask generator: a
regular grid of single-point prompts, three masks per point, filtering by predicted IoU
and stability score, then non-maximum suppression (here by mask IoU rather than box IoU).

Conventions: a slice is ``(H, W)`` in array order (rows, columns); SAM's point prompts are
``(x, y)`` = (column, row) in pixels of the resized model input.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from collections import OrderedDict
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from fmreg.core.intensity import normalize
from fmreg.errors import FmregError, require
from fmreg.segment.base import RoiProposals

if TYPE_CHECKING:  # pragma: no cover - typing only
    from transformers import SamModel

log = logging.getLogger(__name__)

DEFAULT_HUB_ID = "facebook/sam-vit-base"

# SAM was trained on 8-bit RGB normalised with the ImageNet statistics (in 0..255 units).
PIXEL_MEAN = (123.675, 116.28, 103.53)
PIXEL_STD = (58.395, 57.12, 57.375)

# "org/name" as the hub spells repository ids; anything else is treated as a local path.
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")

# Upsampling every mask of a batch to the 1024² model input at once takes ~4 MB per mask;
# chunks bound the peak memory independently of points_per_batch.
_UPSAMPLE_CHUNK = 16


# --------------------------------------------------------------------------- loading


def load_sam_model(model: str | Path, device: str | torch.device = "cpu") -> "SamModel":
    """Load a SAM-family checkpoint in Hugging Face format.

    Args:
        model: A local folder holding ``config.json`` and the weights
            (``model.safetensors`` or ``pytorch_model.bin``), e.g. a download of
            ``facebook/sam-vit-base`` / ``-large`` / ``-huge``, MedSAM or SlimSAM; or a hub id
            ``"org/name"`` (needs internet, or the Hugging Face cache).
        device: Torch device to put the model on.

    Returns:
        The :class:`transformers.SamModel` in eval mode on ``device``.

    Raises:
        MissingExtraError: ``transformers`` is not installed (extra ``sam``).
        FmregError: the folder does not exist or is not a SAM checkpoint, or the hub id
            cannot be fetched.
    """
    transformers = require("transformers", "sam", "the SAM backend")
    path = Path(model).expanduser()
    how = (
        f"download a checkpoint in Hugging Face format on a machine with internet, e.g. "
        f"`hf download {DEFAULT_HUB_ID} --local-dir DIR`, and pass DIR"
    )
    if path.exists():
        if not path.is_dir() or not (path / "config.json").is_file():
            raise FmregError(
                f"SAM model {path.resolve()} is not a Hugging Face model folder (no config.json "
                f"in it): {how}"
            )
        model_type = _config_model_type(path / "config.json")
        if model_type not in (None, "sam"):
            # SamModel would load such a folder with random weights and only a warning.
            raise FmregError(
                f"{path.resolve()} holds a '{model_type}' model, not SAM (model_type 'sam'): "
                "pass a SAM, MedSAM or SlimSAM checkpoint in Hugging Face format"
            )
        source: str | Path = path
    elif isinstance(model, str) and _HUB_ID.match(model):
        source = model
    else:
        raise FmregError(f"SAM model folder {path.resolve()} does not exist: {how}")

    try:
        sam = transformers.SamModel.from_pretrained(source)
    except Exception as exc:  # hub/network/format errors come in many types; all are user-fixable
        reason = _first_line(exc)
        if isinstance(source, Path):
            raise FmregError(f"cannot load SAM model from {path.resolve()}: {reason}") from exc
        raise FmregError(
            f"SAM model '{model}' is not a local folder ({path.resolve()} does not exist) and "
            f"could not be fetched from the Hugging Face hub ({reason}): {how}"
        ) from exc
    return sam.to(device).eval()


def _config_model_type(config: Path) -> str | None:
    try:
        value = json.loads(config.read_text(encoding="utf-8")).get("model_type")
    except (OSError, ValueError, AttributeError) as exc:
        raise FmregError(
            f"cannot read SAM model config {config.resolve()}: {_first_line(exc)}"
        ) from exc
    return value if isinstance(value, str) else None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


# --------------------------------------------------------------------------- geometry


def resized_shape(height: int, width: int, longest: int) -> tuple[int, int]:
    """Shape of an ``(height, width)`` image resized so its longest side is ``longest``.

    Rounds like SAM's ``ResizeLongestSide`` so masks map back to the same pixels.

    Returns:
        ``(h, w)`` in pixels, rows then columns.
    """
    scale = longest / max(height, width)
    return int(height * scale + 0.5), int(width * scale + 0.5)


def resize_longest_side(x: Tensor, longest: int) -> Tensor:
    """Resize ``(N, C, H, W)`` images bilinearly so that ``max(H, W) == longest``.

    Antialiasing is on so a large slice shrunk to 1024 does not alias (SAM resizes with PIL,
    which also low-pass filters).
    """
    h, w = resized_shape(x.shape[-2], x.shape[-1], longest)
    if (h, w) == tuple(x.shape[-2:]):
        return x
    return F.interpolate(x, size=(h, w), mode="bilinear", align_corners=False, antialias=True)


def pad_bottom_right(x: Tensor, size: int, value: float = 0.0) -> Tensor:
    """Pad ``(..., h, w)`` with ``value`` on the bottom and right to ``(..., size, size)``."""
    h, w = x.shape[-2:]
    return F.pad(x, (0, size - w, 0, size - h), value=value)


def intensity_to_rgb255(image: Tensor, window: tuple[float, float] = (0.5, 99.5)) -> Tensor:
    """Map a slice of any intensity range to 0..255 by a percentile window.

    Medical intensities (CT in HU, MR in arbitrary units) must be brought to the 8-bit range
    SAM was trained on; percentiles rather than min/max keep a few outlier voxels from
    compressing the contrast.

    Args:
        image: ``(H, W)`` float slice.
        window: Lower and upper percentiles (0..100) mapped to 0 and 255.

    Returns:
        ``(H, W)`` float32 in [0, 255]; all zeros for a constant slice.
    """
    return normalize(image.detach(), *window) * 255.0


def preprocess(
    image: Tensor,
    image_size: int = 1024,
    window: tuple[float, float] = (0.5, 99.5),
) -> tuple[Tensor, tuple[int, int]]:
    """Turn one slice into SAM's input tensor.

    Percentile window to 0..255, grey to RGB, resize the longest side to ``image_size``,
    normalise with the ImageNet mean/std, and pad bottom/right with zeros (after
    normalisation, as SAM does) to a square.

    Args:
        image: ``(H, W)`` float slice, any intensity range.
        image_size: Side of the square model input in pixels (the model config's
            ``vision_config.image_size``, 1024 for SAM).
        window: Percentiles mapped to 0 and 255, see :func:`intensity_to_rgb255`.

    Returns:
        ``pixel_values`` ``(1, 3, image_size, image_size)`` float32 and the ``(h, w)`` of the
        resized, unpadded image inside it (top-left corner).
    """
    # SAM expects RGB; a grey slice goes into all three channels.
    rgb = intensity_to_rgb255(image, window)[None, None].expand(1, 3, -1, -1)
    resized = resize_longest_side(rgb.contiguous(), image_size)
    mean = torch.tensor(PIXEL_MEAN, dtype=torch.float32).view(1, 3, 1, 1)
    std = torch.tensor(PIXEL_STD, dtype=torch.float32).view(1, 3, 1, 1)
    normalised = (resized - mean) / std
    resized_hw = (int(resized.shape[-2]), int(resized.shape[-1]))
    return pad_bottom_right(normalised, image_size), resized_hw


def postprocess_masks(
    low_res: Tensor,
    resized_hw: tuple[int, int],
    original_hw: tuple[int, int],
    image_size: int = 1024,
) -> Tensor:
    """Map decoder mask logits back onto the original slice.

    Upsample to the padded model input, crop the padding, resize to the original shape
    (the inverse of :func:`preprocess`'s geometry, as in SAM).

    Args:
        low_res: ``(N, h_l, w_l)`` mask logits from the decoder (256 x 256 for SAM).
        resized_hw: ``(h, w)`` of the unpadded image in the model input.
        original_hw: ``(H, W)`` of the slice.
        image_size: Side of the square model input in pixels.

    Returns:
        ``(N, H, W)`` float32 logits; the mask is ``logits > 0``.
    """
    x = low_res[:, None].to(torch.float32)
    x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False)
    x = x[..., : resized_hw[0], : resized_hw[1]]
    x = F.interpolate(x, size=tuple(original_hw), mode="bilinear", align_corners=False)
    return x[:, 0]


def point_grid(points_per_side: int) -> Tensor:
    """Regular grid of prompts, as SAM's automatic mask generator places them.

    Returns:
        ``(points_per_side**2, 2)`` float32 ``(x, y)`` in [0, 1], cell centres, i.e. the
        fraction of the image width (x, columns) and height (y, rows).
    """
    offset = 1.0 / (2 * points_per_side)
    side = torch.linspace(offset, 1 - offset, points_per_side)
    ys, xs = torch.meshgrid(side, side, indexing="ij")
    return torch.stack([xs.reshape(-1), ys.reshape(-1)], dim=-1)


# --------------------------------------------------------------------------- mask scoring


def stability_score(logits: Tensor, offset: float = 1.0, threshold: float = 0.0) -> Tensor:
    """SAM's stability score: IoU of the mask at ``threshold + offset`` vs ``- offset``.

    The high-threshold mask is contained in the low-threshold one, so the IoU is the ratio of
    their areas. A mask whose area barely changes when the logit cut moves has a sharp edge.

    Args:
        logits: ``(N, H, W)`` mask logits.
        offset: Logit shift either side of ``threshold``.
        threshold: The logit at which the mask is cut (0 for SAM).

    Returns:
        ``(N,)`` float32 in [0, 1]; 0 where even the low-threshold mask is empty.
    """
    inner = (logits > threshold + offset).flatten(1).sum(1, dtype=torch.int64)
    outer = (logits > threshold - offset).flatten(1).sum(1, dtype=torch.int64)
    return torch.where(outer > 0, inner.double() / outer.clamp(min=1).double(), 0.0).float()


def mask_iou_matrix(masks: Tensor, block: int = 128) -> Tensor:
    """Pairwise IoU of binary masks.

    Args:
        masks: ``(K, H, W)`` bool.
        block: Masks converted to float at a time; bounds memory at ``2 * block * H * W``
            floats.

    Returns:
        ``(K, K)`` float32 IoU (0 between two empty masks).
    """
    k = masks.shape[0]
    flat = masks.reshape(k, -1)
    areas = flat.sum(1, dtype=torch.int64).to(torch.float32)
    inter = torch.zeros((k, k), dtype=torch.float32, device=masks.device)
    for i in range(0, k, block):
        a = flat[i : i + block].to(torch.float32)
        for j in range(i, k, block):
            b = a if j == i else flat[j : j + block].to(torch.float32)
            part = a @ b.T
            inter[i : i + block, j : j + block] = part
            inter[j : j + block, i : i + block] = part.T
    union = areas[:, None] + areas[None, :] - inter
    return torch.where(union > 0, inter / union.clamp(min=1), torch.zeros_like(inter))


def mask_boxes(masks: Tensor) -> Tensor:
    """Bounding boxes of binary masks.

    Args:
        masks: ``(K, H, W)`` bool.

    Returns:
        ``(K, 4)`` int64 ``(row0, col0, row1, col1)``, end-exclusive; all zeros for an empty
        mask.
    """
    k, h, w = masks.shape
    rows, cols = masks.any(2), masks.any(1)
    # argmax returns the first maximum, i.e. the first True; flipping gives the last.
    row0 = rows.to(torch.uint8).argmax(1)
    row1 = h - rows.flip(1).to(torch.uint8).argmax(1)
    col0 = cols.to(torch.uint8).argmax(1)
    col1 = w - cols.flip(1).to(torch.uint8).argmax(1)
    boxes = torch.stack([row0, col0, row1, col1], dim=1)
    return torch.where(rows.any(1)[:, None], boxes, torch.zeros_like(boxes))


def mask_nms(masks: Tensor, scores: Tensor, iou_thresh: float = 0.7) -> Tensor:
    """Greedy non-maximum suppression by mask IoU.

    Going down the scores, a mask is kept unless it overlaps an already kept mask with
    IoU > ``iou_thresh``. The result equals greedy NMS on the full IoU matrix, but a mask is
    only compared, inside its bounding box, with kept masks whose boxes and areas allow an
    IoU above the threshold: the full matrix costs ``K**2 * H * W`` and everything mode with
    lenient thresholds gives thousands of candidates.

    Args:
        masks: ``(K, H, W)`` bool.
        scores: ``(K,)`` higher is better.
        iou_thresh: Suppress at IoU above this.

    Returns:
        ``(K',)`` int64 indices (CPU) of the kept masks, best score first.
    """
    k = masks.shape[0]
    if k == 0:
        return torch.zeros(0, dtype=torch.int64)
    order = torch.argsort(scores.cpu(), descending=True, stable=True)
    areas = masks.flatten(1).sum(1, dtype=torch.int64).cpu()
    boxes = mask_boxes(masks).cpu()
    kept = torch.empty(k, dtype=torch.int64)
    n_kept = 0
    for idx in order.tolist():
        if n_kept:
            others = kept[:n_kept]
            box, other = boxes[idx], boxes[others]
            lo = torch.maximum(box[:2], other[:, :2])
            hi = torch.minimum(box[2:], other[:, 2:])
            overlap = (hi - lo).clamp(min=0).prod(1)
            area, other_areas = areas[idx], areas[others]
            # Intersection <= box overlap and <= the smaller area; union >= the larger area.
            bound = torch.minimum(overlap, torch.minimum(other_areas, area))
            bound = bound / torch.maximum(other_areas, area).clamp(min=1)
            near = others[bound > iou_thresh]
            if len(near):
                r0, c0, r1, c1 = box.tolist()
                mask = masks[idx, r0:r1, c0:c1]
                overlap_px = masks[:, r0:r1, c0:c1][near.to(masks.device)] & mask
                inter = overlap_px.flatten(1).sum(1, dtype=torch.int64).cpu().to(torch.float64)
                iou = inter / (area + areas[near] - inter).clamp(min=1)
                if bool((iou > iou_thresh).any()):
                    continue
        kept[n_kept] = idx
        n_kept += 1
    return kept[:n_kept].clone()


def remove_small_regions(mask: Tensor, min_area: int) -> Tensor:
    """Fill holes and drop islands smaller than ``min_area`` pixels (8-connected).

    SAM's everything mode leaves speckle at mask edges; for ROI matching a speckle is a
    spurious region that drags prototypes and centroids.

    Args:
        mask: ``(H, W)`` bool.
        min_area: Area in pixels below which a hole is filled or an island removed.

    Returns:
        ``(H, W)`` bool on the same device.
    """
    from scipy import ndimage

    if min_area <= 0:
        return mask
    out = mask.detach().cpu().numpy().copy()
    eight = np.ones((3, 3), dtype=bool)
    for fill_holes in (True, False):
        region = ~out if fill_holes else out
        labels, n = ndimage.label(region, structure=eight)
        if n == 0:
            continue
        sizes = np.bincount(labels.ravel(), minlength=n + 1)
        small = sizes < min_area
        small[0] = False  # label 0 is the complement, not a component
        if small.any():
            out[small[labels]] = fill_holes
    return torch.from_numpy(out).to(mask.device)


# --------------------------------------------------------------------------- backend


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
        pred_iou_thresh: float = 0.88,
        stability_score_thresh: float = 0.95,
        stability_offset: float = 1.0,
        nms_iou_thresh: float = 0.7,
        min_region_area: int = 0,
        intensity_window: tuple[float, float] = (0.5, 99.5),
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
