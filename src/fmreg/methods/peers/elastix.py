"""Peer baseline: elastix (itk-elastix), default affine then default B-spline parameter maps.

Needs the optional ``fmreg[peers]`` extra; ``itk`` is imported only when the method runs, so
a missing package gives a one-line error that names the extra.

Elastix's transform maps fixed points to moving points, the convention of
:mod:`fmreg.transforms.displacement`; transformix turns it into a dense displacement field on the fixed grid
in world millimetres, which is used as it is.
"""

from __future__ import annotations

import os
import tempfile
from typing import Any, Sequence

import numpy as np
import torch

from fmreg.errors import FmregError, require
from fmreg.transforms.displacement import DisplacementField
from fmreg.core.grid import Frame, Grid
from fmreg.core.image import Image, check_pair
from fmreg.methods.base import Extra, RegistrationResult, add_method
from fmreg.methods.params import declare


def _itk():
    return require("itk", "peers", "elastix")


def to_itk(image: Image, itk=None):
    """An ``itk.Image[itk.F, ndim]`` holding a copy of ``image`` with its exact geometry."""
    itk = itk or _itk()
    arr = np.ascontiguousarray(image.data.detach().cpu().numpy().astype(np.float32))
    out = itk.image_from_array(arr)
    grid = image.grid
    out.SetSpacing([float(s) for s in grid.spacing])
    out.SetOrigin([float(o) for o in grid.origin])
    out.SetDirection(itk.matrix_from_array(np.ascontiguousarray(grid.direction_matrix())))
    return out


def grid_of_itk(img) -> Grid:
    """The :class:`Grid` of an ITK image (components x, y[, z])."""
    itk = _itk()
    size = tuple(int(s) for s in img.GetLargestPossibleRegion().GetSize())
    direction = itk.array_from_matrix(img.GetDirection())
    return Grid(
        tuple(reversed(size)),
        tuple(float(s) for s in img.GetSpacing()),
        tuple(float(o) for o in img.GetOrigin()),
        tuple(float(d) for d in np.asarray(direction, dtype=np.float64).ravel()),
    )


@add_method("elastix")
class ElastixMethod:
    """elastix with its default ``affine`` and ``bspline`` parameter maps, run in sequence.

    Args:
        maps: Names of elastix default parameter maps to run in order.
        overrides: Parameter-map entries to override, applied to every map,
            e.g. ``{"MaximumNumberOfIterations": "128"}``.
        threads: Worker threads; default ``os.cpu_count()``.
    """

    name = "elastix"
    uses_labels = False
    EXTRA = Extra("peers", "itk")

    def __init__(
        self,
        maps: Sequence[str] = ("affine", "bspline"),
        overrides: dict[str, Any] | None = None,
        threads: int | None = None,
    ) -> None:
        self.maps = tuple(str(m) for m in maps)
        if not self.maps:
            raise FmregError("elastix: give at least one parameter map (e.g. affine, bspline)")
        self.overrides = {str(k): v for k, v in (overrides or {}).items()}
        self.threads = int(threads or os.cpu_count() or 1)

    PARAMS = declare(__init__, {
        "maps": (("translation", "rigid", "affine", "bspline"), "elastix default parameter maps, run in order"),
        "overrides": (None, 'parameter-map entries for every map, e.g. {"MaximumNumberOfIterations": "128"}'),
        "threads": (">= 1", "worker threads (null: all cores)"),
    })

    def parameters(self) -> dict:
        return {
            "maps": list(self.maps),
            "overrides": {k: (list(v) if isinstance(v, (list, tuple)) else v) for k, v in self.overrides.items()},
            "threads": self.threads,
        }

    def _parameter_object(self, itk):
        po = itk.ParameterObject.New()
        for name in self.maps:
            pmap = po.GetDefaultParameterMap(name)
            for key, value in self.overrides.items():
                values = value if isinstance(value, (list, tuple)) else [value]
                pmap[key] = [str(v) for v in values]
            # The registration's own resampled moving image is not used: transformix gives the field.
            pmap["WriteResultImage"] = ["false"]
            po.AddParameterMap(pmap)
        return po

    def register_itk(self, fixed: Image, moving: Image):
        """Run elastix; returns ``(transform parameter object, fixed itk image, moving itk image)``."""
        itk = _itk()
        # ElastixRegistrationMethod.SetNumberOfThreads crashes the process with multi-metric
        # maps such as the default B-spline map (ITKElastix issues #160 and #295); ITK's
        # global default thread count is honoured instead.
        threader = itk.MultiThreaderBase
        if threader.GetGlobalDefaultNumberOfThreads() != self.threads:
            threader.SetGlobalDefaultNumberOfThreads(self.threads)
        fixed_itk = to_itk(fixed, itk)
        moving_itk = to_itk(moving, itk)
        reg = itk.ElastixRegistrationMethod.New(fixed_itk, moving_itk)
        reg.SetParameterObject(self._parameter_object(itk))
        reg.SetLogToConsole(False)
        reg.SetLogToFile(False)
        reg.UpdateLargestPossibleRegion()
        return reg.GetTransformParameterObject(), fixed_itk, moving_itk

    def register(self, fixed: Image, moving: Image, fixed_labels=None, moving_labels=None) -> RegistrationResult:
        check_pair(fixed, moving)
        transform, _, moving_itk = self.register_itk(fixed, moving)
        field = field_from_transform(transform, moving_itk, fixed.grid)
        return RegistrationResult(field, self.name, self.parameters(), {})


def field_from_transform(transform, moving_itk, grid: Grid) -> DisplacementField:
    """The dense displacement of an elastix transform parameter object, via transformix.

    Transformix samples ``T(x) - x`` (world mm) on the grid written in the transform
    parameters, the fixed grid, which must equal ``grid``.
    """
    itk = _itk()
    # Transformix also writes deformationField.nii into its output directory (the working
    # directory unless told otherwise): give it a scratch folder.
    with tempfile.TemporaryDirectory(prefix="fmreg-transformix-") as scratch:
        transformix = itk.TransformixFilter.New(moving_itk)
        transformix.SetTransformParameterObject(transform)
        transformix.SetComputeDeformationField(True)
        transformix.SetOutputDirectory(scratch)
        transformix.SetLogToConsole(False)
        transformix.SetLogToFile(False)
        transformix.UpdateLargestPossibleRegion()
        ddf = transformix.GetOutputDeformationField()
        ddf_grid = grid_of_itk(ddf)
        arr = np.array(itk.array_from_image(ddf), dtype=np.float32)  # copy: (*shape, ndim), x-first
    if not ddf_grid.same_as(grid):  # pragma: no cover - elastix writes the fixed grid
        raise FmregError(
            f"elastix returned a deformation field on {ddf_grid.describe()}, expected the fixed "
            f"grid {grid.describe()}"
        )
    data = torch.from_numpy(np.ascontiguousarray(np.moveaxis(arr, -1, 0)))
    return DisplacementField(data, grid, Frame.PHYSICAL)
