"""Reading and writing images, label maps and displacement fields with their geometry.

NIfTI goes through SimpleITK, never through nibabel's affine: ACDC files carry an sform of
unit scale with qform_code 0, for which nibabel reports 1 mm voxels while the spacing
SimpleITK reads from the header (1.5625×1.5625×10 mm) is the real one.

All writers are atomic: data goes to a temporary file in the destination folder, which is
renamed over the destination only when complete.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Iterator

import numpy as np
import SimpleITK as sitk
import torch

from fmreg.errors import FmregError
from fmreg.transforms.displacement import DisplacementField
from fmreg.core.grid import Frame, Grid
from fmreg.core.image import Image

# ITK warns about every ACDC file ("unexpected scales in sform") although it then reads
# the correct spacing from the header; the warning would drown fmreg's own messages.
sitk.ProcessObject.SetGlobalWarningDisplay(False)

NIFTI_SUFFIXES = (".nii", ".nii.gz", ".nrrd", ".nhdr", ".mha", ".mhd")
RASTER_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
NUMPY_SUFFIXES = (".npy", ".npz")


def suffix_of(path: str | Path) -> str:
    name = str(path).lower()
    for suf in (".nii.gz",):
        if name.endswith(suf):
            return suf
    return Path(name).suffix


def is_2d_raster(path: str | Path) -> bool:
    return suffix_of(path) in RASTER_SUFFIXES


# ---------------------------------------------------------------------------- atomic output
@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` that replaces ``path`` on success.

    The temporary name keeps the suffix so that writers choosing a format by extension
    (SimpleITK, Pillow) still do the right thing.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".fmreg-tmp-", suffix=suffix_of(path), dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    # mkstemp makes 0600 files; outputs should get the permissions any new file would get.
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp_path, 0o666 & ~umask)
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


# ---------------------------------------------------------------------------- images
def _first_line(exc: Exception) -> str:
    """The first line of an exception's message (ITK's run to dozens), or its type."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _check_readable(path: Path) -> None:
    if not path.exists():
        raise FmregError(f"file not found: {path}")
    if path.is_dir():
        raise FmregError(f"expected a file, got a folder: {path}")


def grid_of(img: sitk.Image) -> Grid:
    """The :class:`Grid` of a SimpleITK image."""
    return Grid(
        tuple(reversed(img.GetSize())), img.GetSpacing(), img.GetOrigin(), img.GetDirection()
    )


def to_sitk(image: Image | np.ndarray, grid: Grid | None = None) -> sitk.Image:
    """A SimpleITK image with the data and geometry of ``image``."""
    if isinstance(image, Image):
        arr, grid = image.data.detach().cpu().numpy(), image.grid
    else:
        arr = image
    assert grid is not None
    img = sitk.GetImageFromArray(np.ascontiguousarray(arr))
    img.SetSpacing(grid.spacing)
    img.SetOrigin(grid.origin)
    img.SetDirection(grid.direction)
    return img


def _from_array(arr: np.ndarray, grid: Grid, label: bool, name: str) -> Image:
    if label:
        if np.issubdtype(arr.dtype, np.floating):
            if not np.all(np.isfinite(arr)) or not np.allclose(arr, np.round(arr)):
                raise FmregError(f"{name}: label map has non-integer values")
        data = torch.from_numpy(np.round(arr).astype(np.int64) if np.issubdtype(arr.dtype, np.floating) else arr.astype(np.int64))
    else:
        data = torch.from_numpy(np.asarray(arr, dtype=np.float32).copy())
    return Image(data, grid, name)


def read_image(path: str | Path, label: bool = False) -> Image:
    """Read an image or label map with its geometry.

    Args:
        path: NIfTI/NRRD/MHA (3D or 2D), PNG/JPG/TIF/BMP (2D; RGB converted to luminance,
            spacing 1, origin 0), or NumPy ``.npy`` / ``.npz`` (array order, unit spacing; an
            ``.npz`` may hold ``spacing``/``origin``/``direction`` arrays in x, y[, z] order and
            the data under ``image``, ``vol``, ``seg`` (for labels) or its only array).
        label: Read as an integer label map: values are kept exactly, never interpolated.

    Returns:
        An :class:`Image`: float32 intensities, or int64 labels.
    """
    path = Path(path)
    _check_readable(path)
    name = path.name
    suf = suffix_of(path)
    try:
        if suf in RASTER_SUFFIXES:
            from PIL import Image as PILImage

            with PILImage.open(path) as pil:
                if pil.mode in ("RGB", "RGBA", "P", "CMYK", "LA"):
                    pil = pil.convert("L")
                arr = np.asarray(pil)
            if arr.ndim != 2:
                raise FmregError(f"{path}: expected a single-channel or RGB picture")
            return _from_array(arr, Grid(arr.shape), label, name)
        if suf in NUMPY_SUFFIXES:
            return _read_numpy(path, label)
        img = sitk.ReadImage(str(path))
        if suf in (".nii", ".nii.gz") and not label:
            _check_nifti_finite(path)
    except FmregError:
        raise
    except Exception as exc:  # unreadable file: a one-line message, not a traceback
        raise FmregError(f"cannot read {path}: {_first_line(exc)}") from exc
    if img.GetNumberOfComponentsPerPixel() != 1:
        if label:
            raise FmregError(f"{path}: a label map must have one component per voxel")
        img = _luminance(img)
    if img.GetDimension() == 4:
        raise FmregError(f"{path}: 4D images are not supported; extract a 3D frame first")
    return _from_array(sitk.GetArrayFromImage(img), grid_of(img), label, name)


def _check_nifti_finite(path: Path) -> None:
    """Raise when a float NIfTI-1 file stores NaN/Inf voxels.

    ITK's NIfTI reader silently replaces NaN and Inf by 0, so the check has to read the
    stored values itself (NIfTI-1 layout: datatype at byte 70, vox_offset at byte 108).
    """
    import gzip
    import struct

    opener = gzip.open if suffix_of(path) == ".nii.gz" else open
    with opener(path, "rb") as fh:
        raw = fh.read()
    if len(raw) < 352:
        return
    for endian in ("<", ">"):
        if struct.unpack(endian + "i", raw[:4])[0] == 348:
            break
    else:
        return  # NIfTI-2 or unknown: nothing more to check
    datatype = struct.unpack(endian + "h", raw[70:72])[0]
    dtype = {16: "f4", 64: "f8"}.get(datatype)
    if dtype is None:
        return
    offset = int(struct.unpack(endian + "f", raw[108:112])[0])
    values = np.frombuffer(raw, dtype=endian + dtype, offset=offset)
    bad = int((~np.isfinite(values)).sum())
    if bad:
        raise FmregError(f"{path} contains {bad} NaN/Inf intensities")


def _luminance(img: sitk.Image) -> sitk.Image:
    arr = sitk.GetArrayFromImage(img).astype(np.float32)
    lum = arr[..., :3] @ np.array([0.299, 0.587, 0.114], dtype=np.float32) if arr.shape[-1] >= 3 else arr[..., 0]
    out = sitk.GetImageFromArray(lum)
    out.CopyInformation(img)
    return out


def _read_numpy(path: Path, label: bool) -> Image:
    if suffix_of(path) == ".npy":
        arr = np.load(path, allow_pickle=False)
        return _from_array(arr, Grid(arr.shape), label, path.name)
    with np.load(path, allow_pickle=False) as npz:
        keys = list(npz.keys())
        preferred = ("seg", "label", "labels") if label else ("image", "vol", "data")
        key = next((k for k in preferred if k in keys), None)
        if key is None:
            arrays = [k for k in keys if k not in ("spacing", "origin", "direction")]
            if len(arrays) != 1:
                raise FmregError(f"{path}: cannot tell which array is the image among {arrays}")
            key = arrays[0]
        arr = npz[key]
        geom = {k: tuple(np.asarray(npz[k]).ravel()) for k in ("spacing", "origin", "direction") if k in keys}
    return _from_array(arr, Grid(arr.shape, **geom), label, path.name)


def write_image(image: Image, path: str | Path) -> Path:
    """Write an image atomically. 2D images may go to PNG (intensities scaled to 0–255 when
    they leave that range; label maps written as they are), everything to NIfTI."""
    path = Path(path)
    suf = suffix_of(path)
    with atomic_path(path) as tmp:
        if suf in RASTER_SUFFIXES:
            if image.ndim != 2:
                raise FmregError(f"{path}: only 2D images can be written as {suf}")
            from PIL import Image as PILImage

            arr = image.data.detach().cpu().numpy()
            if image.is_label:
                arr8 = np.clip(arr, 0, 255).astype(np.uint8)
            else:
                lo, hi = float(arr.min()), float(arr.max())
                if lo >= 0 and hi <= 255:
                    arr8 = np.clip(np.round(arr), 0, 255).astype(np.uint8)
                else:
                    arr8 = np.round(255 * (arr - lo) / max(hi - lo, 1e-12)).astype(np.uint8)
            PILImage.fromarray(arr8).save(tmp)
        elif suf in NUMPY_SUFFIXES:
            g = image.grid
            with open(tmp, "wb") as fh:
                np.savez_compressed(fh, image=image.data.numpy(), spacing=g.spacing, origin=g.origin, direction=g.direction)
        else:
            sitk.WriteImage(to_sitk(image), str(tmp), useCompression=suf.endswith(".gz"))
    return path


# ---------------------------------------------------------------------------- fields
def field_to_sitk(field: DisplacementField) -> sitk.Image:
    """An ITK displacement field image (float64 vectors, physical mm, world axes)."""
    u = field.to(Frame.PHYSICAL)
    arr = u.data.detach().cpu().double().movedim(0, -1).numpy()  # (*shape, ndim), x-first
    img = sitk.GetImageFromArray(np.ascontiguousarray(arr), isVector=True)
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
    """Read an ITK displacement field (vectors in physical mm, world axes)."""
    path = Path(path)
    _check_readable(path)
    try:
        img = sitk.ReadImage(str(path))
    except Exception as exc:
        raise FmregError(f"cannot read {path}: {_first_line(exc)}") from exc
    grid = grid_of(img)
    if img.GetNumberOfComponentsPerPixel() != grid.ndim:
        raise FmregError(
            f"{path} is not a displacement field: {img.GetNumberOfComponentsPerPixel()} "
            f"components per voxel on a {grid.ndim}D grid"
        )
    arr = sitk.GetArrayFromImage(img).astype(np.float32)  # (*shape, ndim)
    return DisplacementField(torch.from_numpy(np.moveaxis(arr, -1, 0).copy()), grid, Frame.PHYSICAL)


def field_from_sitk(img: sitk.Image) -> DisplacementField:
    """A :class:`DisplacementField` from an in-memory ITK displacement field image."""
    grid = grid_of(img)
    arr = sitk.GetArrayFromImage(img).astype(np.float32)
    return DisplacementField(torch.from_numpy(np.moveaxis(arr, -1, 0).copy()), grid, Frame.PHYSICAL)
