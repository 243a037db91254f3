"""Where an image shows something: its view inside a padding frame, and frames two images share.

A camera's or microscope's aperture (a fundus photograph's black surround), or a scanner's
reconstruction circle, is a frame of padding around the view that stays where it is on the
grid while the anatomy moves inside it. Two images with the same frame then agree about the
frame whatever the motion, so an intensity term that counts the frame's edge pulls towards the
identity. Padding that differs between the images (a skull-stripped brain's background) is
part of the anatomy's outline and is not a shared frame.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy import ndimage
from torch import Tensor

from fmreg.core.grid import Frame
from fmreg.core.image import Image
from fmreg.core.sampling import sample

__all__ = ["MIN_FRAME_FRACTION", "PADDING_TOLERANCE", "SAME_FRAME_IOU", "padding_mask", "shared_frame_views"]

#: Values within this fraction of the span from the image's minimum to its 99th percentile count
#: as padding (compressed photographs leave a little noise in a black surround).
PADDING_TOLERANCE = 0.01
#: Two frames are one when their views overlap with at least this intersection over union: a
#: frame that stays put coincides to within resampling, while 1.5 px of motion of a 76 px view
#: leaves 0.96.
SAME_FRAME_IOU = 0.99
#: Padding of less than this fraction of the image is not a frame.
MIN_FRAME_FRACTION = 0.01


def padding_mask(data: Tensor) -> Tensor:
    """``(*shape)`` bool: the voxels at (or within :data:`PADDING_TOLERANCE` of) the image's
    minimum that connect to the grid's border through such voxels."""
    a = data.detach().float().numpy()
    lo = float(a.min())
    hi = float(np.percentile(a.ravel()[:: max(1, a.size // 200_000)], 99))
    low = a <= lo + PADDING_TOLERANCE * max(hi - lo, 1e-12)
    labels, count = ndimage.label(low)
    if count == 0:
        return torch.zeros(a.shape, dtype=torch.bool)
    faces = [np.take(labels, index, axis=d).ravel() for d in range(a.ndim) for index in (0, -1)]
    border = np.setdiff1d(np.unique(np.concatenate(faces)), [0])
    return torch.from_numpy(np.isin(labels, border))


def shared_frame_views(fixed: Image, moving: Image) -> tuple[Tensor, Tensor] | None:
    """The two images' views (``(*grid.shape)`` float, 1 inside, 0 in the frame) when they share
    a padding frame on the grid (same place in physical space), else None."""
    fixed_frame, moving_frame = padding_mask(fixed.data), padding_mask(moving.data)
    if float(fixed_frame.float().mean()) < MIN_FRAME_FRACTION or float(moving_frame.float().mean()) < MIN_FRAME_FRACTION:
        return None
    fixed_view = (~fixed_frame).float()
    moving_view = (~moving_frame).float()
    # The moving view where the fixed voxels lie, nothing moved.
    here = sample(moving_view, moving.grid, fixed.grid.coordinates(Frame.PHYSICAL), fill=0.0) >= 0.5
    inside = fixed_view > 0.5
    union = int((here | inside).sum())
    if union == 0 or int((here & inside).sum()) / union < SAME_FRAME_IOU:
        return None
    return fixed_view, moving_view
