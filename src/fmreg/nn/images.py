"""Images into a network and its map back out, through fmreg's geometry.

Each image is brought to the network's input size over its *own* extent (as uniGradICON does),
so the network maps the fixed image's ``NORMALIZED`` frame to the moving image's;
:func:`physical_field` turns that map into a physical displacement on the fixed grid.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fmreg.core.grid import Frame, Grid
from fmreg.core.image import Image
from fmreg.core.intensity import foundation_normalize, resize
from fmreg.transforms.base import Transform
from fmreg.transforms.displacement import DisplacementField


def network_input(image: Image, size: tuple[int, ...], modality: str = "auto") -> Tensor:
    """``(1, 1, *size)`` intensities in [0, 1], resampled over the image's own extent.

    Args:
        image: A 2D or 3D image (its grid's extent is kept: the network sees the whole image).
        size: Network input shape, array order.
        modality: ``"ct"``, ``"mr"`` or ``"auto"`` (:func:`fmreg.core.intensity.foundation_normalize`).
    """
    data = foundation_normalize(image.data, modality)
    return resize(data[None], size)[None]


def physical_field(transform: Transform, fixed: Grid, moving: Grid) -> DisplacementField:
    """A network's map (fixed → moving ``NORMALIZED`` frames) as a physical field on ``fixed``.

    Args:
        transform: Unbatched map from the fixed image's normalized frame to the moving one's.
        fixed, moving: The images' grids (any shapes, spacings, directions).

    Returns:
        ``T(x) − x`` in mm on ``fixed`` (``T(x)`` a physical point of the moving image).
    """
    with torch.no_grad():
        pts = transform.normalized_points(fixed.shape)[0].double()
    world = moving.convert_points(pts, Frame.NORMALIZED, Frame.PHYSICAL)
    u = world.movedim(-1, 0) - fixed.coordinates(Frame.PHYSICAL, dtype=torch.float64)
    return DisplacementField(u.float(), fixed, Frame.PHYSICAL)
