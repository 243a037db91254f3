"""Displacement-field files: ``ddf.nii.gz`` as an ITK displacement field.

The file holds the fixed→moving transform ``T(x) = x + u(x)`` of a registration: one vector
per fixed-grid voxel, in physical mm along the world axes (ITK's convention), so
``sitk.DisplacementFieldTransform(sitk.ReadImage(path, sitk.sitkVectorFloat64))`` loads it
unchanged in SimpleITK, ITK or 3D Slicer.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch

from fmreg.core.grid import Frame
from fmreg.errors import FmregError
from fmreg.io.images import check_readable, first_line, grid_of
from fmreg.io.outputs import atomic_path
from fmreg.transforms.displacement import DisplacementField

__all__ = ["field_to_sitk", "read_field", "write_field"]


def field_to_sitk(field: DisplacementField) -> sitk.Image:
    """An ITK displacement field image (float32 vectors, physical mm, world axes).

    float32 as the field is computed (and as ANTs writes its warps); ITK's
    ``DisplacementFieldTransform`` wants float64 vectors, which ``sitk.ReadImage(path,
    sitk.sitkVectorFloat64)`` gives on reading.
    """
    u = field.to(Frame.PHYSICAL)
    # One vector-last copy (a double copy plus a contiguous one took 0.4 GB for a 3000² field).
    arr = u.data.detach().cpu().to(torch.float32).movedim(0, -1).contiguous().numpy()  # (*shape, ndim), x-first
    img = sitk.GetImageFromArray(arr, isVector=True)
    img.SetSpacing(u.grid.spacing)
    img.SetOrigin(u.grid.origin)
    img.SetDirection(u.grid.direction)
    return img


def write_field(field: DisplacementField, path: str | Path) -> Path:
    """Write ``ddf.nii.gz``: an ITK displacement field that
    ``sitk.DisplacementFieldTransform(sitk.ReadImage(path, sitk.sitkVectorFloat64))`` loads
    as the fixed→moving transform ``T(x) = x + u(x)``."""
    path = Path(path)
    with atomic_path(path) as tmp:
        sitk.WriteImage(field_to_sitk(field), str(tmp), useCompression=str(path).endswith(".gz"))
    return path


def read_field(path: str | Path) -> DisplacementField:
    """Read an ITK displacement field.

    Returns:
        A :class:`DisplacementField` in :attr:`Frame.PHYSICAL` (mm, world axes), data
        ``(ndim, *grid.shape)`` float32 on the file's grid.

    Raises:
        FmregError: Missing or unreadable file, or not one vector component per axis.
    """
    path = Path(path)
    check_readable(path)
    try:
        img = sitk.ReadImage(str(path))
    except Exception as exc:
        raise FmregError(f"cannot read {path}: {first_line(exc)}") from exc
    grid = grid_of(img)
    if img.GetNumberOfComponentsPerPixel() != grid.ndim:
        raise FmregError(
            f"{path} is not a displacement field: {img.GetNumberOfComponentsPerPixel()} "
            f"components per voxel on a {grid.ndim}D grid"
        )
    arr = sitk.GetArrayFromImage(img).astype(np.float32)  # (*shape, ndim)
    return DisplacementField(torch.from_numpy(np.moveaxis(arr, -1, 0).copy()), grid, Frame.PHYSICAL)
