"""Geometric augmentation of training pairs (uniGradICON's): a small random affine per image,
the same random flips and axis permutation for both.

Points and maps are in the ``NORMALIZED`` frame of :mod:`fmreg.core.grid` (components
``x, y[, z]``); data is batch-first ``(B, C, *shape)`` in array order. ``config`` arguments are
:class:`~fmreg.training.synthetic.SyntheticConfig` (only its augmentation fields are read).
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor

from fmreg.core.sampling import identity_points, sample_normalized

__all__ = ["affine_points", "augment", "flip_permute", "flip_permute_points", "random_affine", "random_flip_permute",
           "uniform"]


def uniform(generator: torch.Generator, lo: float, hi: float, *size: int) -> Tensor:
    return lo + (hi - lo) * torch.rand(size, generator=generator)


def random_affine(shape: Sequence[int], generator: torch.Generator, config) -> tuple[Tensor, Tensor]:
    """A small random affine ``A x + b`` (rotation, per-axis scale, shift) in the normalized frame.

    Rotation and scale act on voxel-isotropic coordinates centred on the grid, so a 10° rotation
    of a non-square grid is still a rotation of the voxels.

    Returns:
        ``(ndim, ndim)`` matrix ``A`` and ``(ndim,)`` offset ``b``, normalized units, components
        ``x, y[, z]``.
    """
    nd = len(shape)
    rot = torch.eye(nd, dtype=torch.float64)
    for i, j in ([(0, 1)] if nd == 2 else [(1, 2), (0, 2), (0, 1)]):
        a = math.radians(float(uniform(generator, -config.max_rotation, config.max_rotation, 1)))
        r = torch.eye(nd, dtype=torch.float64)
        r[i, i], r[i, j], r[j, i], r[j, j] = math.cos(a), -math.sin(a), math.sin(a), math.cos(a)
        rot = r @ rot
    scale = uniform(generator, *config.scale_range, nd).double()
    half = torch.tensor([(n - 1) / 2.0 for n in reversed(shape)], dtype=torch.float64)
    matrix = torch.diag(1.0 / half) @ rot @ torch.diag(scale) @ torch.diag(half)
    offset = 2.0 * uniform(generator, -config.max_shift, config.max_shift, nd).double()
    return matrix.float(), offset.float()


def random_flip_permute(shape: Sequence[int], generator: torch.Generator, flip_probability: float = 0.5,
                        permute_probability: float = 0.5) -> tuple[tuple[int, ...], tuple[bool, ...]]:
    """Draw an axis permutation (among axes of equal length, so the shape is kept) and flips.

    Returns:
        ``(perm, flips)``: new array axis ``i`` is old axis ``perm[i]``, then reversed where
        ``flips[i]`` (both in array order).
    """
    nd = len(shape)
    perm = list(range(nd))
    if float(torch.rand(1, generator=generator)) < permute_probability:
        for n in sorted(set(shape)):
            axes = [a for a in range(nd) if shape[a] == n]
            order = torch.randperm(len(axes), generator=generator).tolist()
            for a, o in zip(axes, order):
                perm[a] = axes[o]
    flips = tuple(bool(f) for f in (torch.rand(nd, generator=generator) < flip_probability))
    return tuple(perm), flips


def flip_permute(x: Tensor, perm: Sequence[int], flips: Sequence[bool]) -> Tensor:
    """Apply :func:`random_flip_permute`'s ``(perm, flips)`` to ``(B, C, *shape)`` data (exact)."""
    x = x.permute(0, 1, *(2 + p for p in perm))
    dims = [2 + i for i, f in enumerate(flips) if f]
    return x.flip(dims) if dims else x


def flip_permute_points(points: Tensor, perm: Sequence[int], flips: Sequence[bool]) -> Tensor:
    """The same flips/permutation for a map ``T`` given as ``(B, *shape, ndim)`` normalized points.

    If ``fixed(x) = moving(T(x))`` before, then ``fixed'(x) = moving'(T'(x))`` after, where
    ``T' = M⁻¹ ∘ T ∘ M`` and ``M`` is the signed permutation that the flips/permutation apply
    to the sampling points of both images.
    """
    moved = flip_permute(points.movedim(-1, 1), perm, flips).movedim(1, -1)
    comps = moved.flip(-1)  # array order, to match perm and flips
    sign = torch.tensor([-1.0 if f else 1.0 for f in flips], dtype=points.dtype)
    return (comps[..., list(perm)] * sign).flip(-1)


def affine_points(matrix: Tensor, offset: Tensor, shape: Sequence[int]) -> Tensor:
    return identity_points(shape) @ matrix.T + offset


def augment(moving: Tensor, fixed: Tensor, generator: torch.Generator,
            config) -> tuple[Tensor, Tensor]:
    """uniGradICON-style augmentation of a batch of image pairs.

    Per pair: the same random flips/permutation for both images (so they remain related by a
    diffeomorphism), and an independent small random affine for each (a misalignment that the
    network must recover), resampled linearly with the border extended.

    Args:
        moving, fixed: ``(B, C, *shape)`` images on the same grid shape, array order.
        generator: Random source.
        config: ``flip_probability``, ``permute_probability``, ``max_rotation``, ``scale_range``,
            ``max_shift``.

    Returns:
        The augmented ``(moving, fixed)``, same shapes.
    """
    shape, out = tuple(moving.shape[2:]), []
    for i in range(moving.shape[0]):
        pair = [sample_normalized(image[i:i + 1], affine_points(*random_affine(shape, generator, config), shape),
                                  padding="border") for image in (moving, fixed)]
        perm, flips = random_flip_permute(shape, generator, config.flip_probability, config.permute_probability)
        out.append(flip_permute(torch.cat(pair, dim=1), perm, flips))
    out = torch.cat(out)
    return out[:, :moving.shape[1]], out[:, moving.shape[1]:]
