"""Test pairs with a known transform, cut from one real image (2D).

A registration default that wins on a handful of real pairs may be an accident; a pair made
from a real texture by a transform one chose is a check with an exact answer. Here the moving
image is a central crop of a source image and the fixed image is the source resampled at
``T(x)``, where ``T`` — fixed → moving, the registration convention of
:mod:`fmreg.transforms.displacement` — is a similarity (rotation about the crop centre,
isotropic scale, translation) plus a smooth random local displacement. Both images are real
texture everywhere ``T`` stays inside the source; beyond it the source's border is repeated.

:func:`target_registration_error` scores an estimated field against the true one over the fixed
points that ``T`` maps into the moving image.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from fmreg.core.grid import Frame, Grid
from fmreg.core.image import Image
from fmreg.core.sampling import sample
from fmreg.errors import FmregError
from fmreg.transforms.displacement import DisplacementField

__all__ = ["MAX_ANGLE_DEG", "MAX_SHIFT_FRAC", "SCALE_RANGE", "KnownPair", "SimilarityParams", "known_transform_pair", "random_similarity", "target_registration_error"]


@dataclass(frozen=True)
class SimilarityParams:
    """A 2D similarity about the fixed image's centre, fixed → moving.

    Attributes:
        angle_deg: Rotation, degrees (counter-clockwise in the x-right, y-down pixel frame).
        scale: Isotropic scale factor.
        shift: ``(x, y)`` translation in mm.
        local_mm: Largest component of the smooth local displacement added on top, mm.
    """

    angle_deg: float = 0.0
    scale: float = 1.0
    shift: tuple[float, float] = (0.0, 0.0)
    local_mm: float = 0.0


@dataclass
class KnownPair:
    """A fixed/moving pair and the true fixed → moving displacement on the fixed grid."""

    fixed: Image
    moving: Image
    truth: DisplacementField
    params: SimilarityParams


#: Default bounds of a drawn similarity: shift (fraction of the extent), rotation (degrees), scale.
MAX_SHIFT_FRAC = 0.15
MAX_ANGLE_DEG = 20.0
SCALE_RANGE = (0.9, 1.1)


def random_similarity(rng: np.random.Generator, extent_mm: tuple[float, float], max_shift_frac: float = MAX_SHIFT_FRAC,
                      max_angle_deg: float = MAX_ANGLE_DEG, scale_range: tuple[float, float] = SCALE_RANGE,
                      local_mm: float = 0.0) -> SimilarityParams:
    """A similarity drawn uniformly within the given bounds (translation along x and y as a
    fraction of the image's ``(x, y)`` extent in mm)."""
    angle = float(rng.uniform(-max_angle_deg, max_angle_deg))
    scale = float(rng.uniform(*scale_range))
    shift = tuple(float(s) for s in rng.uniform(-max_shift_frac, max_shift_frac, 2) * np.asarray(extent_mm))
    return SimilarityParams(angle, scale, shift, local_mm)


def _local_field(grid: Grid, amplitude: float, rng: np.random.Generator, waves: int = 3) -> Tensor:
    """``(2, *grid.shape)`` smooth displacement (mm): a sum of random plane waves one to two
    wavelengths across the image, scaled so that its largest component is ``amplitude``."""
    if amplitude <= 0:
        return torch.zeros((2, *grid.shape))
    x = grid.coordinates(Frame.PHYSICAL, dtype=torch.float64)
    extent = max((n - 1) * s for n, s in zip(grid.size, grid.spacing))
    field = torch.zeros((2, *grid.shape), dtype=torch.float64)
    for c in range(2):
        for _ in range(waves):
            k = rng.normal(size=2)
            k *= rng.uniform(1.0, 2.0) * 2 * math.pi / (extent * np.linalg.norm(k))
            phase = rng.uniform(0, 2 * math.pi)
            field[c] += torch.cos(k[0] * x[0] + k[1] * x[1] + phase)
    return (field * (amplitude / float(field.abs().max().clamp_min(1e-9)))).float()


def known_transform_pair(source: Image, params: SimilarityParams, crop: float = 0.75, seed: int = 0) -> KnownPair:
    """Cut a pair with a known transform from ``source`` (see the module docstring).

    Args:
        source: A 2D image (its spacing is honoured; direction must be the identity).
        params: The similarity and the local amplitude.
        crop: Side of the central crop (the moving image) as a fraction of the source.
        seed: Seed of the local displacement.

    Returns:
        Both images on the crop's grid (origin 0, the source's spacing) and the true field.
    """
    if source.ndim != 2:
        raise FmregError(f"known-transform pairs are 2D, got a {source.ndim}D image")
    if not 0.1 <= crop <= 1.0:
        raise FmregError(f"crop {crop} must be in [0.1, 1]")
    g = source.grid
    shape = tuple(max(8, int(round(n * crop))) for n in g.shape)
    start = [(n - m) // 2 for n, m in zip(g.shape, shape)]  # array order (row, column)
    grid = Grid(shape, g.spacing)
    moving = Image(source.data[start[0]:start[0] + shape[0], start[1]:start[1] + shape[1]].clone(), grid)

    x = grid.coordinates(Frame.PHYSICAL, dtype=torch.float64)  # (2, H, W), (x, y) mm
    centre = torch.tensor([(n - 1) * s / 2 for n, s in zip(grid.size, grid.spacing)], dtype=torch.float64)
    a = math.radians(params.angle_deg)
    rot = params.scale * torch.tensor([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]], dtype=torch.float64)
    d = x - centre[:, None, None]
    mapped = torch.einsum("ij,j...->i...", rot, d) + centre[:, None, None]
    mapped = mapped + torch.tensor(params.shift, dtype=torch.float64)[:, None, None]
    mapped = mapped + _local_field(grid, params.local_mm, np.random.default_rng(seed)).double()
    truth = DisplacementField((mapped - x).float(), grid)

    # The crop's point y (mm from its first pixel) is the source's voxel y / spacing + start.
    index = mapped.movedim(0, -1) / torch.tensor(g.spacing, dtype=torch.float64)
    index = index + torch.tensor([start[1], start[0]], dtype=torch.float64)
    src_points = g.convert_points(index, Frame.VOXEL, Frame.PHYSICAL).movedim(-1, 0)
    fixed = Image(sample(source.data.float(), g, src_points, fill=None), grid)
    return KnownPair(fixed, moving, truth, params)


def target_registration_error(estimate: DisplacementField, truth: DisplacementField) -> dict[str, float]:
    """Distance (mm) between the estimated and the true ``T(x)`` over the fixed points ``T`` maps
    into the moving image (the crop), which is where the images say anything.

    Returns:
        ``{"mean", "p90", "max", "identity_mean"}``; ``identity_mean`` is the identity's error.
    """
    if estimate.grid.shape != truth.grid.shape:
        raise FmregError(f"estimate on {estimate.grid.shape}, truth on {truth.grid.shape}")
    u_true = truth.to(Frame.PHYSICAL).data.double()
    u_est = estimate.to(Frame.PHYSICAL).data.double()
    grid = truth.grid
    y = grid.coordinates(Frame.PHYSICAL, dtype=torch.float64) + u_true
    hi = torch.tensor([(n - 1) * s for n, s in zip(grid.size, grid.spacing)], dtype=torch.float64)
    inside = ((y >= 0) & (y <= hi[:, None, None])).all(dim=0)
    if not bool(inside.any()):
        raise FmregError("the true transform maps no fixed point into the moving image")
    err = (u_est - u_true).norm(dim=0)[inside]
    ident = u_true.norm(dim=0)[inside]
    return {"mean": float(err.mean()), "p90": float(err.quantile(0.9)), "max": float(err.max()),
            "identity_mean": float(ident.mean())}
