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
from scipy.spatial import cKDTree
from torch import Tensor

from fmreg.core.grid import Frame
from fmreg.core.image import Image
from fmreg.core.sampling import sample

__all__ = ["MIN_FRAME_FRACTION", "PADDING_TOLERANCE", "SAME_FRAME_VOXELS", "padding_mask", "shared_frame_views"]

#: Values within this fraction of the span from the image's minimum to its 99th percentile count
#: as padding (compressed photographs leave a little noise in a black surround).
PADDING_TOLERANCE = 0.01
#: Two frames are one when the median distance between their edges is at most this (fixed
#: voxels): a frame that stays put coincides to within resampling.
SAME_FRAME_VOXELS = 0.5
#: Padding of less than this fraction of the image is not a frame.
MIN_FRAME_FRACTION = 0.01
#: Edge voxels per side whose distances give the median.
MEDIAN_SAMPLES = 4096


def padding_mask(data: Tensor) -> Tensor:
    """``(*shape)`` bool: the voxels at (or within :data:`PADDING_TOLERANCE` of) the image's
    minimum that connect to the grid's border through such voxels, with the single brighter
    voxels (noise) they surround."""
    a = data.detach().float().numpy()
    lo = float(a.min())
    hi = float(np.percentile(a.ravel()[:: max(1, a.size // 200_000)], 99))
    low = a <= lo + PADDING_TOLERANCE * max(hi - lo, 1e-12)
    # A closing fills the specks of noise that would otherwise riddle the frame with holes.
    low |= ndimage.binary_closing(low, np.ones((3,) * a.ndim, dtype=bool))
    labels, count = ndimage.label(low)
    if count == 0:
        return torch.zeros(a.shape, dtype=torch.bool)
    faces = [np.take(labels, index, axis=d).ravel() for d in range(a.ndim) for index in (0, -1)]
    border = np.setdiff1d(np.unique(np.concatenate(faces)), [0])
    return torch.from_numpy(np.isin(labels, border))


def shared_frame_views(fixed: Image, moving: Image) -> tuple[Tensor, Tensor] | None:
    """The two images' views (``(*grid.shape)`` float, 1 inside, 0 in the frame) when they share
    a padding frame that stays put on the grid, else None.

    The frames are one when their edges coincide: the median distance from each edge voxel to
    the other image's edge (on the fixed grid, both ways) is at most :data:`SAME_FRAME_VOXELS`.
    The median lets noise, or dark anatomy touching the frame in one image only, move part of
    an edge; a frame that moves with the anatomy moves all of it.
    """
    fixed_frame, moving_frame = padding_mask(fixed.data), padding_mask(moving.data)
    if min(float(fixed_frame.float().mean()), float(moving_frame.float().mean())) < MIN_FRAME_FRACTION:
        return None
    fixed_view, moving_view = (~fixed_frame).float(), (~moving_frame).float()
    # The moving view where the fixed voxels lie, nothing moved (on one grid: as it is).
    if moving.grid == fixed.grid:
        here = ~moving_frame.numpy()
    else:
        here = (sample(moving_view, moving.grid, fixed.grid.coordinates(Frame.PHYSICAL), fill=0.0) >= 0.5).numpy()
    inside = ~fixed_frame.numpy()
    edges = [m & ~ndimage.binary_erosion(m, border_value=1) for m in (inside, here)]
    if not all(e.any() for e in edges):
        return None
    points = [np.argwhere(e).astype(np.float64) for e in edges]  # voxel indices of each edge
    # The median needs a few thousand evenly spread edge voxels per side, not all of them.
    probe = [p[:: max(1, len(p) // MEDIAN_SAMPLES)] for p in points]
    apart = np.concatenate([cKDTree(points[1]).query(probe[0])[0], cKDTree(points[0]).query(probe[1])[0]])
    return (fixed_view, moving_view) if float(np.median(apart)) <= SAME_FRAME_VOXELS else None
