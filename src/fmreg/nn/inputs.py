"""Images → network inputs: uniGradICON's intensity preprocessing at the network's input size."""

from __future__ import annotations

from torch import Tensor

from fmreg.core.image import Image
from fmreg.core.intensity import foundation_normalize, resize


def network_input(image: Image, size: tuple[int, ...], modality: str = "auto") -> Tensor:
    """``(1, 1, *size)`` intensities in [0, 1], resampled over the image's own extent.

    Args:
        image: A 2D or 3D image (its grid's extent is kept: the network sees the whole image).
        size: Network input shape, array order.
        modality: ``"ct"``, ``"mr"`` or ``"auto"`` (:func:`fmreg.core.intensity.foundation_normalize`).
    """
    data = foundation_normalize(image.data, modality)
    return resize(data[None], size)[None]
