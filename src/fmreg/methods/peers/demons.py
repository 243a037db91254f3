"""Peer baseline: SimpleITK's diffeomorphic demons with histogram matching and a pyramid.

SimpleITK is a core dependency, so this peer is always available. The moving image's
histogram is matched to the fixed image's, then
:class:`SimpleITK.DiffeomorphicDemonsRegistrationFilter` runs coarse to fine; each level starts
from the previous level's displacement, resampled onto the finer grid.

The pyramid shrinks each axis on its own: an axis whose spacing is already coarse (the slice
axis of a cardiac stack such as ACDC, 1.56×1.56×10 mm) is shrunk less or not at all, and no
axis is shrunk below a few voxels.

Demons (with ``UseImageSpacing``) estimates a displacement field on the fixed grid, in world
millimetres, that maps fixed points to moving points, the convention of :mod:`fmreg.transforms.displacement`.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import SimpleITK as sitk
import torch

from fmreg.errors import FmregError
from fmreg.transforms.displacement import DisplacementField
from fmreg.core.grid import Frame, Grid
from fmreg.core.image import Image, check_pair
from fmreg.io.images import to_sitk
from fmreg.methods.base import RegistrationResult, add_method
from fmreg.methods.params import declare

# An axis is never shrunk to fewer voxels than this.
_MIN_LEVEL_SIZE = 8


def axis_shrink_factors(grid: Grid, factor: int, min_size: int = _MIN_LEVEL_SIZE) -> tuple[int, ...]:
    """Per-axis shrink factors (components ``x, y[, z]``) for a nominal pyramid ``factor``.

    The finest axis is shrunk by ``factor``; a coarser axis by less, so the level's voxels
    become closer to isotropic instead of more anisotropic; no axis drops below ``min_size``
    voxels (an axis already shorter than that is never shrunk).
    """
    finest = min(grid.spacing)
    out = []
    for size, sp in zip(grid.size, grid.spacing):
        f = max(1, int(math.floor(factor * finest / sp + 1e-6)))
        f = min(f, max(1, size // min_size))
        out.append(f)
    return tuple(out)


def _level_reference(image: sitk.Image, factors: Sequence[int]) -> sitk.Image:
    """An empty image covering the same extent as ``image`` with ``size / factor`` voxels."""
    size = image.GetSize()
    spacing = np.asarray(image.GetSpacing(), dtype=np.float64)
    new_size = [max(1, int(round(s / f))) for s, f in zip(size, factors)]
    new_spacing = spacing * np.asarray(size, dtype=np.float64) / np.asarray(new_size, dtype=np.float64)
    direction = np.asarray(image.GetDirection(), dtype=np.float64).reshape(len(size), len(size))
    # Keep the outer edge of the first voxel where it was.
    origin = np.asarray(image.GetOrigin(), dtype=np.float64) + direction @ (0.5 * (new_spacing - spacing))
    ref = sitk.Image([int(s) for s in new_size], sitk.sitkFloat32)
    ref.SetSpacing([float(s) for s in new_spacing])
    ref.SetOrigin([float(o) for o in origin])
    ref.SetDirection(image.GetDirection())
    return ref


def _shrink(image: sitk.Image, factors: Sequence[int], sigma: float) -> sitk.Image:
    """Gaussian-smooth ``image`` along the shrunk axes and resample it on the level grid."""
    if all(f == 1 for f in factors):
        return image
    spacing = image.GetSpacing()
    smoothed = image
    for axis, (f, sp) in enumerate(zip(factors, spacing)):
        if f > 1 and sigma > 0:  # anti-alias only the axes that are shrunk (sigma in mm)
            smoothed = sitk.RecursiveGaussian(smoothed, sigma=float(sigma * f * sp), direction=axis)
    ref = _level_reference(image, factors)
    return sitk.Resample(smoothed, ref, sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkFloat32)


def _resample_field(field: sitk.Image, reference: sitk.Image) -> sitk.Image:
    """A displacement field resampled (linearly, world-aligned) onto ``reference``'s grid.

    Displacements are world vectors in mm, so they carry over between levels unchanged.
    """
    return sitk.Resample(field, reference, sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkVectorFloat64)


@add_method("demons")
class DemonsMethod:
    """SimpleITK diffeomorphic demons, multi-resolution, with histogram matching.

    Args:
        shrink_factors: Nominal pyramid factors, coarse to fine (per-axis factors follow
            :func:`axis_shrink_factors`).
        iterations: Demons iterations per level.
        smoothing_sigma: Anti-alias Gaussian sigma per pyramid level, in units of the shrink
            factor times the voxel size (0.5 = half a coarse voxel).
        field_sigma: Gaussian smoothing of the displacement field after every iteration
            (the regularisation), in voxels of each level, the same on every axis (ITK's
            demons smooth in index units).
        update_sigma: Smoothing of each update field (fluid-like regularisation), in voxels;
            0 turns it off.
        max_step: Largest update per iteration, in voxels (ITK's ``MaximumUpdateStepLength``;
            0.5 is Thirion's and ITK's default).
        physical_smoothing: Make ``field_sigma`` / ``update_sigma`` isotropic in mm instead
            of in voxels: the sigma applies along the finest axis and shrinks in proportion
            along coarser axes (an ACDC slice axis is then barely smoothed). Off by default.
        histogram_levels, match_points: Histogram matching of the moving to the fixed image.
        threads: Worker threads; default SimpleITK's (all cores).
    """

    name = "demons"
    uses_labels = False

    def __init__(
        self,
        shrink_factors: Sequence[int] = (4, 2, 1),
        iterations: Sequence[int] | int = (100, 50, 25),
        smoothing_sigma: float = 0.5,
        field_sigma: float = 1.5,
        update_sigma: float = 0.0,
        max_step: float = 0.5,
        histogram_levels: int = 1024,
        match_points: int = 7,
        physical_smoothing: bool = False,
        threads: int | None = None,
    ) -> None:
        self.shrink_factors = tuple(int(f) for f in shrink_factors)
        if isinstance(iterations, int):
            iterations = (iterations,) * len(self.shrink_factors)
        self.iterations = tuple(int(i) for i in iterations)
        if len(self.iterations) != len(self.shrink_factors):
            raise FmregError(
                f"demons: {len(self.iterations)} iteration counts for {len(self.shrink_factors)} "
                "shrink factors: give one per level"
            )
        self.smoothing_sigma = float(smoothing_sigma)
        self.field_sigma = float(field_sigma)
        self.update_sigma = float(update_sigma)
        self.max_step = float(max_step)
        self.histogram_levels = int(histogram_levels)
        self.match_points = int(match_points)
        self.physical_smoothing = bool(physical_smoothing)
        self.threads = threads

    PARAMS = declare(__init__, {
        "shrink_factors": (">= 1", "pyramid shrink factors, coarse to fine"),
        "iterations": (">= 0", "demons iterations per level (one value, or one per level)"),
        "smoothing_sigma": (">= 0", "anti-alias sigma per level, in shrink factor x voxel size"),
        "field_sigma": (">= 0", "smoothing of the field after each iteration (the regularisation), voxels"),
        "update_sigma": (">= 0", "smoothing of each update (fluid-like), voxels; 0: off"),
        "max_step": ("> 0", "largest update per iteration, voxels"),
        "histogram_levels": (">= 1", "histogram bins of the moving-to-fixed histogram matching"),
        "match_points": (">= 1", "match points of the histogram matching"),
        "physical_smoothing": (None, "field_sigma and update_sigma isotropic in mm, not in voxels"),
        "threads": (">= 1", "worker threads (null: all cores)"),
    })

    def parameters(self) -> dict:
        return {
            "shrink_factors": list(self.shrink_factors),
            "iterations": list(self.iterations),
            "smoothing_sigma": self.smoothing_sigma,
            "field_sigma": self.field_sigma,
            "update_sigma": self.update_sigma,
            "max_step": self.max_step,
            "physical_smoothing": self.physical_smoothing,
            "histogram_levels": self.histogram_levels,
            "match_points": self.match_points,
            "histogram_matching": "moving to fixed",
            "filter": "SimpleITK DiffeomorphicDemonsRegistrationFilter",
        }

    def _sigmas(self, level: sitk.Image, sigma: float) -> list[float]:
        """Per-axis Gaussian sigmas in voxels (ITK's demons smooth in index units)."""
        spacing = level.GetSpacing()
        if not self.physical_smoothing:
            return [float(sigma)] * len(spacing)
        finest = min(spacing)
        return [float(sigma * finest / sp) for sp in spacing]

    def register(self, fixed: Image, moving: Image, fixed_labels=None, moving_labels=None) -> RegistrationResult:
        check_pair(fixed, moving)
        fixed_itk = sitk.Cast(to_sitk(fixed.data.float(), fixed.grid), sitk.sitkFloat32)
        moving_itk = sitk.Cast(to_sitk(moving.data.float(), moving.grid), sitk.sitkFloat32)
        if not moving.grid.same_as(fixed.grid):
            # Demons needs both images on one grid: put the moving image on the fixed grid
            # at the same world points (identity), which keeps the convention unchanged.
            moving_itk = sitk.Resample(
                moving_itk, fixed_itk, sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkFloat32
            )
        moving_itk = sitk.HistogramMatching(
            moving_itk,
            fixed_itk,
            numberOfHistogramLevels=self.histogram_levels,
            numberOfMatchPoints=self.match_points,
            thresholdAtMeanIntensity=True,
        )

        field: sitk.Image | None = None
        for factor, iters in zip(self.shrink_factors, self.iterations):
            factors = axis_shrink_factors(fixed.grid, factor)
            f_level = _shrink(fixed_itk, factors, self.smoothing_sigma)
            m_level = _shrink(moving_itk, factors, self.smoothing_sigma)
            sd = self._sigmas(f_level, self.field_sigma)
            demons = sitk.DiffeomorphicDemonsRegistrationFilter()
            demons.SetNumberOfIterations(iters)
            demons.SetUseImageSpacing(True)
            demons.SetSmoothDisplacementField(self.field_sigma > 0)
            if self.field_sigma > 0:
                demons.SetStandardDeviations(sd)
            demons.SetSmoothUpdateField(self.update_sigma > 0)
            if self.update_sigma > 0:
                demons.SetUpdateFieldStandardDeviations(self._sigmas(f_level, self.update_sigma))
            demons.SetMaximumUpdateStepLength(self.max_step)
            demons.SetMaximumRMSError(0.0)  # run the iterations asked for
            if self.threads:
                demons.SetNumberOfThreads(int(self.threads))
            if field is None:
                field = demons.Execute(f_level, m_level)
            else:
                init = _resample_field(field, f_level)
                field = demons.Execute(f_level, m_level, init)
        assert field is not None
        if tuple(field.GetSize()) != fixed.grid.size:  # pragma: no cover - last factor > 1
            field = _resample_field(field, fixed_itk)
        arr = sitk.GetArrayFromImage(field).astype(np.float32)  # (*shape, ndim), x-first
        data = torch.from_numpy(np.ascontiguousarray(np.moveaxis(arr, -1, 0)))
        result_field = DisplacementField(data, fixed.grid, Frame.PHYSICAL)
        return RegistrationResult(result_field, self.name, self.parameters(), {})
