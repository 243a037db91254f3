"""SAM's pre- and post-processing of one slice: the geometry between slice and model input.

Done here rather than with ``SamProcessor``, whose image processor needs torchvision in
transformers 5. A slice is ``(H, W)`` in array order (rows, columns); the model input is a
square of ``image_size`` pixels holding the slice resized so its longest side fills it, at
the top-left corner, padded bottom/right.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from fmreg.core.intensity import normalize

__all__ = [
    "INTENSITY_WINDOW",
    "PIXEL_MEAN",
    "PIXEL_STD",
    "intensity_to_rgb255",
    "pad_bottom_right",
    "postprocess_masks",
    "preprocess",
    "resize_longest_side",
    "resized_shape",
]

# SAM was trained on 8-bit RGB normalised with the ImageNet statistics (in 0..255 units).
PIXEL_MEAN = (123.675, 116.28, 103.53)
PIXEL_STD = (58.395, 57.12, 57.375)
# Percentiles of a slice mapped to 0 and 255: medical intensities have no fixed 8-bit range.
INTENSITY_WINDOW = (0.5, 99.5)


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


def intensity_to_rgb255(image: Tensor, window: tuple[float, float] = INTENSITY_WINDOW) -> Tensor:
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
    window: tuple[float, float] = INTENSITY_WINDOW,
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
