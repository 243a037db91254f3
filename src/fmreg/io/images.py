"""Reading and writing images and label maps with their geometry (fields: :mod:`fmreg.io.fields`).

NIfTI goes through SimpleITK, never through nibabel's affine: ACDC files carry an sform of
unit scale with qform_code 0, for which nibabel reports 1 mm voxels while the spacing
SimpleITK reads from the header (1.5625×1.5625×10 mm) is the real one.

All writers are atomic (:func:`fmreg.io.outputs.atomic_path`): data goes to a temporary file in
the destination folder, which is renamed over the destination only when complete.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch

from fmreg.core.grid import Grid
from fmreg.core.image import Image, LabelMap
from fmreg.errors import FmregError
from fmreg.io.outputs import atomic_path
from fmreg.io.paths import suffix_of

# ITK warns about every ACDC file ("unexpected scales in sform") although it then reads
# the correct spacing from the header; the warning would drown fmreg's own messages.
sitk.ProcessObject.SetGlobalWarningDisplay(False)

NIFTI_SUFFIXES = (".nii", ".nii.gz", ".nrrd", ".nhdr", ".mha", ".mhd")
RASTER_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
NUMPY_SUFFIXES = (".npy", ".npz")


def is_2d_raster(path: str | Path) -> bool:
    """True for a picture file (PNG, JPG, ...): 2D, unit pixel grid, written back as a picture."""
    return suffix_of(path) in RASTER_SUFFIXES


# ---------------------------------------------------------------------------- images
# ITK's decorations around the reason: the C++ source line SimpleITK puts first, the
# "sitk::ERROR:" / "ITK ERROR: NrrdImageIO(0x55d2...):" prefixes and teem's "[nrrd] func:" chain.
_ITK_SOURCE_LINE = re.compile(r"^Exception thrown in SimpleITK \w+: .*:\d+:$")
_ITK_PREFIX = re.compile(r"^(sitk::ERROR:|ITK ERROR:)\s*(\w+\(0x[0-9a-fA-F]+\):\s*)?")
_NRRD_PREFIX = re.compile(r"^\[nrrd\]\s*\w+:\s*")
_HINTS = {
    "Unable to determine ImageIO reader": "not an image format ITK reads, or a damaged file",
}


def first_line(exc: Exception) -> str:
    """The reason an exception gives, in one line, or its type.

    SimpleITK's messages span several lines and start with the C++ source location
    (``Exception thrown in SimpleITK ImageFileReader_Execute: ...cxx:99:``), which says nothing
    to a user: that line and ITK's prefixes are dropped and the description kept, with the
    last detail of a chain (e.g. why NRRD data could not be read) appended.
    """
    lines = [ln.strip() for ln in str(exc).strip().splitlines() if ln.strip()]
    if not lines:
        return type(exc).__name__
    if not _ITK_SOURCE_LINE.match(lines[0]):
        return lines[0]
    parts = [_NRRD_PREFIX.sub("", _ITK_PREFIX.sub("", ln)) for ln in lines[1:]]
    # teem's chain repeats "trouble ..." at every level: only its last detail says why.
    parts = [p for p in parts if p and not p.startswith("trouble")]
    if not parts:
        return "ITK could not read the file (it gave no reason)"
    text = parts[0] if len(parts) == 1 else f"{parts[0]} {parts[-1]}"
    hint = next((h for k, h in _HINTS.items() if text.startswith(k)), None)
    return f"{text} ({hint})" if hint else text


def check_readable(path: Path) -> None:
    """Raise a one-line :class:`FmregError` when ``path`` is missing, a folder or unreadable."""
    if not path.exists():
        raise FmregError(f"file not found: {path}")
    if path.is_dir():
        raise FmregError(f"expected a file, got a folder: {path}")
    if not os.access(path, os.R_OK):
        raise FmregError(f"cannot read {path}: permission denied")


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


def _from_array(arr: np.ndarray, grid: Grid, is_label: bool, name: str) -> Image:
    if is_label:
        if np.issubdtype(arr.dtype, np.floating):
            if not np.all(np.isfinite(arr)) or not np.allclose(arr, np.round(arr)):
                raise FmregError(f"{name}: label map has non-integer values")
        data = torch.from_numpy(np.round(arr).astype(np.int64) if np.issubdtype(arr.dtype, np.floating) else arr.astype(np.int64))
        return LabelMap(data, grid, name)
    return Image(torch.from_numpy(np.asarray(arr, dtype=np.float32).copy()), grid, name)


def read_image(path: str | Path, is_label: bool = False) -> Image:
    """Read an image or label map with its geometry.

    Args:
        path: NIfTI/NRRD/MHA (3D or 2D), PNG/JPG/TIF/BMP (2D; RGB converted to luminance,
            spacing 1, origin 0), or NumPy ``.npy`` / ``.npz`` (array order, unit spacing; an
            ``.npz`` may hold ``spacing``/``origin``/``direction`` arrays in x, y[, z] order and
            the data under ``image``, ``vol``, ``seg`` (for labels) or its only array).
        is_label: Read as an integer label map: values are kept exactly, never interpolated.

    Returns:
        An :class:`Image` of float32 intensities, or a :class:`LabelMap` of int64 labels.
    """
    path = Path(path)
    check_readable(path)
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
            return _from_array(arr, Grid(arr.shape), is_label, name)
        if suf in NUMPY_SUFFIXES:
            return _read_numpy(path, is_label)
        img = sitk.ReadImage(str(path))
        if suf in (".nii", ".nii.gz") and not is_label:
            _check_nifti_finite(path)
    except FmregError:
        raise
    except Exception as exc:  # unreadable file: a one-line message, not a traceback
        raise FmregError(f"cannot read {path}: {first_line(exc)}") from exc
    if img.GetNumberOfComponentsPerPixel() != 1:
        if is_label:
            raise FmregError(f"{path}: a label map must have one component per voxel")
        img = _luminance(img)
    if img.GetDimension() == 4:
        raise FmregError(f"{path}: 4D images are not supported; extract a 3D frame first")
    return _from_array(sitk.GetArrayFromImage(img), grid_of(img), is_label, name)


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


def _read_numpy(path: Path, is_label: bool) -> Image:
    if suffix_of(path) == ".npy":
        arr = np.load(path, allow_pickle=False)
        return _from_array(arr, Grid(arr.shape), is_label, path.name)
    with np.load(path, allow_pickle=False) as npz:
        keys = list(npz.keys())
        preferred = ("seg", "label", "labels") if is_label else ("image", "vol", "data")
        key = next((k for k in preferred if k in keys), None)
        if key is None:
            arrays = [k for k in keys if k not in ("spacing", "origin", "direction")]
            if len(arrays) != 1:
                raise FmregError(f"{path}: cannot tell which array is the image among {arrays}")
            key = arrays[0]
        arr = npz[key]
        geom = {k: tuple(np.asarray(npz[k]).ravel()) for k in ("spacing", "origin", "direction") if k in keys}
    return _from_array(arr, Grid(arr.shape, **geom), is_label, path.name)


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
