"""The imaged object (the body, the brain): the largest bright region inside the field of view.

Used to start a fit from the objects' moments (:mod:`fmreg.optimize.initialization`) and to
keep background regions out of the ROI matching (:mod:`fmreg.correspond.pairs`).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from fmreg.core.image import Image

#: An object covering less of the image than this is not the imaged body (fraction of voxels).
MIN_OBJECT_FRACTION = 0.10
#: An object touching more of the image border than this is cut by the field of view.
MAX_BORDER_FRACTION = 0.02

def object_mask(image: Image) -> Tensor | None:
    """The imaged object: largest component above Otsu's threshold, holes filled.

    Args:
        image: Any 2D or 3D image.

    Returns:
        ``(*image.grid.shape)`` bool mask, or None when no object lies inside the field of
        view (see :data:`MIN_OBJECT_FRACTION`, :data:`MAX_BORDER_FRACTION`).
    """
    from scipy import ndimage as ndi
    from skimage.filters import threshold_otsu

    spacing = np.asarray(image.grid.spacing_array, dtype=float)
    a = ndi.gaussian_filter(image.data.float().numpy(), sigma=1.0 / (spacing / spacing.min()))
    if not np.isfinite(a).all() or float(a.max()) <= float(a.min()):
        return None
    mask = a > threshold_otsu(a)
    # Opening (≈3 mm) cuts the thin bridges to tables, blankets and tubes; axes with coarser
    # voxels (thick slices) are not opened, which would erase the first and last slice.
    radius = np.round(3.0 / spacing).astype(int)
    radius[np.argmin(spacing)] = max(1, radius[np.argmin(spacing)])
    structure = np.ones(tuple(2 * r + 1 for r in radius), dtype=bool)
    mask = ndi.binary_opening(mask, structure=structure)
    labels, n = ndi.label(mask)
    if n == 0:
        return None
    sizes = np.bincount(labels.ravel())[1:]
    mask = labels == 1 + int(np.argmax(sizes))
    border = np.zeros_like(mask)
    for axis in range(mask.ndim):
        if mask.shape[axis] < 3:
            continue
        index = [slice(None)] * mask.ndim
        for end in (0, -1):
            index[axis] = end
            border[tuple(index)] = True
    # Filling holes changes neither the border contact nor (much) the size: check first.
    if (mask & border).sum() > MAX_BORDER_FRACTION * border.sum():
        return None
    mask = ndi.binary_fill_holes(mask)
    if mask.mean() < MIN_OBJECT_FRACTION:
        return None
    return torch.from_numpy(mask)
