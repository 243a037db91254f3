"""``fmreg known-pairs``: benchmark pairs with known transforms, cut from the user's 2D images.

Each source image gives one pair per seed (:mod:`fmreg.evaluate.known_transforms`: a random
similarity plus a smooth local field). The pairs are written with landmark files, so that
``fmreg bench OUTDIR/pairs.csv -m samreg -m elastix ...`` scores every method's target
registration error against the known transform, peers in the same run.
"""

from __future__ import annotations

import csv
import io as _io
import os
from dataclasses import replace
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import Tensor

from fmreg.app.common import Log, stderr_log
from fmreg.core.grid import Frame, Grid
from fmreg.core.image import Image, check_contrast
from fmreg.errors import FmregError
from fmreg.evaluate.known_transforms import (MAX_ANGLE_DEG, MAX_SHIFT_FRAC, SCALE_RANGE, KnownPair, known_transform_pair,
                                             random_similarity)
from fmreg.io.fields import write_field
from fmreg.io.images import read_image, write_image
from fmreg.io.outputs import Staging, check_outputs
from fmreg.io.paths import absolute

__all__ = ["aperture_mask", "known_landmarks", "through_aperture", "write_known_pairs"]

MANIFEST_COLUMNS = ("name", "fixed", "moving", "fixed_landmarks", "moving_landmarks")


def aperture_mask(grid: Grid, radius: float) -> Tensor:
    """``(*grid.shape)`` bool: a centred disc of ``radius`` times the smaller side (pixels)."""
    h, w = grid.shape
    y, x = torch.meshgrid(torch.arange(float(h)), torch.arange(float(w)), indexing="ij")
    return (y - (h - 1) / 2) ** 2 + (x - (w - 1) / 2) ** 2 <= (radius * min(h, w)) ** 2


def through_aperture(pair: KnownPair, radius: float) -> KnownPair:
    """The pair seen through one aperture that stays put (a camera's): both images keep a centred
    disc (:func:`aperture_mask`) and are set to the source's minimum outside it."""
    fill = float(min(pair.fixed.data.min(), pair.moving.data.min()))

    def framed(image: Image) -> Image:
        return Image(torch.where(aperture_mask(image.grid, radius), image.data, torch.full_like(image.data, fill)),
                     image.grid, image.name)

    return replace(pair, fixed=framed(pair.fixed), moving=framed(pair.moving))


def known_landmarks(pair: KnownPair, per_side: int = 12, aperture: float | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Landmarks of a known pair: a ``per_side`` × ``per_side`` grid of fixed points and their
    true moving positions, keeping the points that land at least a pixel inside the moving image
    (and, with ``aperture``, that lie inside both images' aperture discs).

    Returns:
        ``(fixed, moving)``, each ``(N, 2)`` float64 pixel coordinates ``(x, y)`` = (column, row).
    """
    grid: Grid = pair.fixed.grid
    size = np.asarray(grid.size, dtype=np.float64)  # (x, y) pixels
    ticks = [np.linspace(0.05 * (n - 1), 0.95 * (n - 1), per_side) for n in size]
    xs, ys = np.meshgrid(*ticks, indexing="xy")
    fixed_px = np.stack([xs.ravel(), ys.ravel()], axis=1)
    fixed_mm = grid.convert_points(torch.as_tensor(fixed_px), Frame.VOXEL, Frame.PHYSICAL)
    moving_mm = pair.truth.map_points(fixed_mm)
    moving_grid = pair.moving.grid
    moving_px = moving_grid.convert_points(moving_mm, Frame.PHYSICAL, Frame.VOXEL).numpy()
    hi = np.asarray(moving_grid.size, dtype=np.float64) - 2.0
    inside = ((moving_px >= 1.0) & (moving_px <= hi)).all(axis=1)
    if aperture is not None:
        for px, g in ((fixed_px, grid), (moving_px, moving_grid)):
            centre = (np.asarray(g.size, dtype=np.float64) - 1) / 2
            inside &= np.linalg.norm(px - centre, axis=1) <= aperture * min(g.size) - 1.0
    return fixed_px[inside], moving_px[inside]


def _landmark_csv(points: np.ndarray) -> str:
    out = _io.StringIO()
    w = csv.writer(out, lineterminator="\n")
    w.writerow(["x", "y"])
    w.writerows([[f"{x:.4f}", f"{y:.4f}"] for x, y in points])
    return out.getvalue()


def write_known_pairs(
    sources: Sequence[str | os.PathLike],
    outdir: str | os.PathLike,
    seeds: Sequence[int] = (1, 2),
    local_mm: float = 3.0,
    overwrite: bool = False,
    log: Log = stderr_log,
    aperture: float | None = None,
    max_shift: float = MAX_SHIFT_FRAC,
    max_angle: float = MAX_ANGLE_DEG,
    scale_range: tuple[float, float] = SCALE_RANGE,
) -> Path:
    """Write one known-transform pair per source image and seed, and their manifest.

    Args:
        sources: 2D images (any format fmreg reads); each is the texture of its pairs.
        outdir: Output folder: ``pairs.csv``, and per pair ``<name>_fixed.nii.gz``,
            ``_moving.nii.gz``, ``_fixed_landmarks.csv``, ``_moving_landmarks.csv`` and the
            true field ``_true_ddf.nii.gz`` (ITK displacement field, fixed → moving, mm).
        seeds: One pair per seed and source (the similarity and the local field are drawn
            from it: the same seed gives the same pair).
        local_mm: Largest component of the smooth local displacement, mm.
        overwrite: Replace earlier outputs in a folder that holds a source image.
        log: Progress lines.
        aperture: See both images through one centred disc of this radius (fraction of the
            smaller side, in (0, 0.5]) that stays put, as a camera's aperture
            (:func:`through_aperture`); None: the whole images.
        max_shift: Largest translation along x and y, a fraction of the moving image's extent.
        max_angle: Largest rotation, degrees.
        scale_range: Range of the isotropic scale.

    Returns:
        The manifest's path.
    """
    if not sources:
        raise FmregError("give at least one source image")
    if not seeds or len(set(seeds)) != len(seeds) or min(seeds) < 0:
        raise FmregError("seeds must be distinct non-negative integers")
    if not (np.isfinite(local_mm) and local_mm >= 0):
        raise FmregError(f"local_mm must be a finite number >= 0, got {local_mm}")
    if aperture is not None and not 0 < aperture <= 0.5:
        raise FmregError(f"aperture must be in (0, 0.5] (a fraction of the smaller side), got {aperture}")
    if not 0 <= max_shift <= 0.5 or not 0 <= max_angle <= 180:
        raise FmregError(f"max_shift must be in [0, 0.5] and max_angle in [0, 180], got {max_shift} and {max_angle}")
    if not 0 < scale_range[0] <= scale_range[1] < 10:
        raise FmregError(f"scale range must be 0 < low <= high < 10, got {scale_range[0]} {scale_range[1]}")
    outdir = absolute(outdir)
    names = _pair_names(sources, seeds)
    check_outputs([outdir / "pairs.csv", *(outdir / f"{n}_fixed.nii.gz" for n in names)], list(map(Path, sources)),
                  overwrite)
    rows: list[dict[str, Any]] = []
    with Staging(outdir) as staging:
        for (source, seed), name in zip(((s, k) for s in sources for k in seeds), names):
            image = read_image(source)
            if image.ndim != 2:
                raise FmregError(f"{source}: known-transform pairs are 2D, this image is {image.ndim}D")
            check_contrast(image, "source image")
            extent = tuple(0.75 * n * s for n, s in zip(image.grid.size, image.grid.spacing))
            params = random_similarity(np.random.default_rng(seed), extent, max_shift, max_angle, tuple(scale_range),
                                       local_mm)
            pair = known_transform_pair(image, params, crop=0.75, seed=seed)
            if aperture is not None:
                pair = through_aperture(pair, aperture)
            fixed_px, moving_px = known_landmarks(pair, aperture=aperture)
            write_image(pair.fixed, staging.path(f"{name}_fixed.nii.gz"))
            write_image(pair.moving, staging.path(f"{name}_moving.nii.gz"))
            write_field(pair.truth, staging.path(f"{name}_true_ddf.nii.gz"))
            for role, pts in (("fixed", fixed_px), ("moving", moving_px)):
                staging.path(f"{name}_{role}_landmarks.csv").write_text(_landmark_csv(pts), encoding="utf-8")
            rows.append({"name": name, "fixed": f"{name}_fixed.nii.gz", "moving": f"{name}_moving.nii.gz",
                         "fixed_landmarks": f"{name}_fixed_landmarks.csv",
                         "moving_landmarks": f"{name}_moving_landmarks.csv"})
            log(f"{name}: rotation {params.angle_deg:.1f}°, scale {params.scale:.3f}, shift "
                f"({params.shift[0]:.1f}, {params.shift[1]:.1f}) mm, {len(fixed_px)} landmarks")
        with staging.path("pairs.csv").open("w", newline="", encoding="utf-8") as f:
            w = csv.DictWriter(f, fieldnames=MANIFEST_COLUMNS, lineterminator="\n")
            w.writeheader()
            w.writerows(rows)
    return outdir / "pairs.csv"


def _pair_names(sources: Sequence[str | os.PathLike], seeds: Sequence[int]) -> list[str]:
    """``<source stem>_s<seed>``, unique (a repeated stem gets its position appended)."""
    stems = [Path(s).name.split(".")[0] or "image" for s in sources]
    names = []
    for i, stem in enumerate(stems):
        tag = stem if stems.count(stem) == 1 else f"{stem}{i + 1}"
        names += [f"{tag}_s{k}" for k in seeds]
    return names
