"""Peer baseline: ANTs SyN through antspyx (``ants.registration(..., type_of_transform="SyN")``).

Needs the optional ``fmreg[peers]`` extra; ``ants`` is imported only when the method runs, so
a missing package gives a one-line error that names the extra.

ANTs works in ITK's (LPS) physical space, like SimpleITK and fmreg, so images go across with
their spacing, origin and direction unchanged (only the array is transposed: antspyx arrays
are indexed ``[x, y, z]``). The forward transforms (``fwdtransforms``: the SyN warp, then the
affine) map fixed points to moving points; ``antsApplyTransforms`` composes them into one
displacement field on the fixed grid, which is the field fmreg returns.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fmreg.errors import FmregError, require
from fmreg.transforms.displacement import DisplacementField
from fmreg.core.grid import Frame, Grid
from fmreg.core.image import Image, check_pair
from fmreg.methods.base import Extra, RegistrationResult, add_method
from fmreg.methods.params import declare


def _ants():
    return require("ants", "peers", "ANTs")


def to_ants(image: Image, ants=None):
    """An ``ANTsImage`` (float32) holding a copy of ``image`` with its exact geometry."""
    ants = ants or _ants()
    arr = image.data.detach().cpu().numpy().astype(np.float32)
    grid = image.grid
    return ants.from_numpy(
        np.ascontiguousarray(arr.T),  # antspyx indexes [x, y, z]
        origin=[float(o) for o in grid.origin],
        spacing=[float(s) for s in grid.spacing],
        direction=np.ascontiguousarray(grid.direction_matrix()),
    )


def grid_of_ants(img) -> Grid:
    """The :class:`Grid` of an ``ANTsImage``."""
    return Grid(
        tuple(reversed([int(s) for s in img.shape])),
        tuple(float(s) for s in img.spacing),
        tuple(float(o) for o in img.origin),
        tuple(float(d) for d in np.asarray(img.direction, dtype=np.float64).ravel()),
    )


def field_from_transforms(
    ants, fixed_ants, moving_ants, transforms: list[str], grid: Grid, workdir: Path
) -> DisplacementField:
    """Compose ANTs transforms (applied as ``apply_transforms`` would) into one field on ``grid``."""
    path = ants.apply_transforms(
        fixed=fixed_ants, moving=moving_ants, transformlist=list(transforms), compose=str(workdir / "composed_")
    )
    if not path or not Path(path).exists():
        raise FmregError("ANTs could not compose its transforms into a displacement field")
    ddf = ants.image_read(str(path))
    ddf_grid = grid_of_ants(ddf)
    if not ddf_grid.same_as(grid) or ddf.components != grid.ndim:
        raise FmregError(
            f"ANTs composed a field on {ddf_grid.describe()} with {ddf.components} components, "
            f"expected the fixed grid {grid.describe()}"
        )
    arr = np.asarray(ddf.numpy(), dtype=np.float32)  # (x, y[, z], ndim)
    data = arr.T  # (ndim, [z,] y, x): components first, array order
    return DisplacementField(torch.from_numpy(np.ascontiguousarray(data)), grid, Frame.PHYSICAL)


@add_method("ants")
class AntsMethod:
    """ANTs SyN (affine then symmetric normalisation) with antspyx's defaults.

    Args:
        type_of_transform: antspyx transform type (``"SyN"`` by default).
        random_seed: Seed for ANTs' random metric sampling (``None``: antspyx's default,
            which varies run to run).
        options: Extra keyword arguments for ``ants.registration`` (e.g.
            ``{"reg_iterations": [40, 20, 10]}``).
    """

    name = "ants"
    uses_labels = False
    EXTRA = Extra("peers", "ants")

    def __init__(
        self,
        type_of_transform: str = "SyN",
        random_seed: int | None = None,
        options: dict[str, Any] | None = None,
    ) -> None:
        self.type_of_transform = str(type_of_transform)
        self.random_seed = None if random_seed is None else int(random_seed)
        self.options = dict(options or {})

    PARAMS = declare(__init__, {
        "type_of_transform": (None, "antspyx transform type, e.g. SyN, SyNRA, ElasticSyN, Affine"),
        "random_seed": (">= 0", "seed of ANTs' random metric sampling (null: varies run to run)"),
        "options": (None, 'extra ants.registration keywords, e.g. {"reg_iterations": [40, 20, 10]}'),
    })

    def parameters(self) -> dict:
        return {
            "type_of_transform": self.type_of_transform,
            "random_seed": self.random_seed,
            "options": {k: (list(v) if isinstance(v, tuple) else v) for k, v in self.options.items()},
        }

    def register_ants(self, fixed: Image, moving: Image, workdir: Path) -> tuple[Any, Any, dict]:
        """Run ``ants.registration``; returns ``(fixed ANTsImage, moving ANTsImage, result dict)``."""
        ants = _ants()
        fixed_ants, moving_ants = to_ants(fixed, ants), to_ants(moving, ants)
        config = getattr(ants, "config", None)
        saved = getattr(config, "_random_seed", None)
        if self.random_seed is not None and config is not None:
            config._random_seed = self.random_seed  # passed on as antsRegistration --random-seed
        try:
            result = ants.registration(
                fixed=fixed_ants,
                moving=moving_ants,
                type_of_transform=self.type_of_transform,
                outprefix=str(workdir / "reg_"),
                verbose=False,
                **self.options,
            )
        finally:
            if self.random_seed is not None and config is not None:
                config._random_seed = saved
        return fixed_ants, moving_ants, result

    def register(self, fixed: Image, moving: Image, fixed_labels=None, moving_labels=None) -> RegistrationResult:
        check_pair(fixed, moving)
        ants = _ants()
        with tempfile.TemporaryDirectory(prefix="fmreg-ants-") as tmp:
            workdir = Path(tmp)
            fixed_ants, moving_ants, result = self.register_ants(fixed, moving, workdir)
            field = field_from_transforms(ants, fixed_ants, moving_ants, result["fwdtransforms"], fixed.grid, workdir)
        return RegistrationResult(field, self.name, self.parameters(), {})
