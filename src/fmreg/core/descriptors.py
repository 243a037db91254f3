"""Dense image descriptors: MIND-SSC, the modality-independent self-similarity context.

MIND-SSC (Heinrich et al., MICCAI 2013) describes each voxel by how similar the patches around
pairs of its neighbours are to each other, so it depends on local structure, not on the
intensity mapping: images of different modalities or contrasts give comparable descriptors.
It serves SAMReg's classical prototype encoder and a registration similarity
(:class:`~fmreg.losses.image.MINDSSC`).
"""

from __future__ import annotations

import math
from itertools import combinations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["blur_replicate", "mind_ssc"]


def blur_replicate(x: Tensor, sigma: float) -> Tensor:
    """Separable Gaussian blur of ``(B, C, *shape)`` maps (2D or 3D), edges replicated; kernel
    radius ``ceil(3σ)``, σ in voxels (0: no blur)."""
    if sigma <= 0:
        return x
    radius = max(1, int(math.ceil(3.0 * sigma)))
    t = torch.arange(-radius, radius + 1, dtype=x.dtype, device=x.device)
    kernel = torch.exp(-0.5 * (t / sigma) ** 2)
    kernel = kernel / kernel.sum()
    ndim, channels = x.dim() - 2, x.shape[1]
    conv = F.conv2d if ndim == 2 else F.conv3d
    # Last axis first (as a row-then-column 2D blur does): the same sums in the same order.
    for axis in reversed(range(ndim)):
        pad = [0] * (2 * ndim)
        pad[2 * (ndim - 1 - axis)] = pad[2 * (ndim - 1 - axis) + 1] = radius
        size = [1] * ndim
        size[axis] = kernel.numel()
        x = conv(F.pad(x, pad, mode="replicate"), kernel.reshape(1, 1, *size).expand(channels, 1, *size),
                 groups=channels)
    return x


def _neighbour_pairs(ndim: int) -> tuple[list[tuple[int, ...]], list[tuple[int, int]]]:
    """The axis neighbours at unit distance (array order offsets) and the compared pairs.

    2D: up, right, down, left and all 6 of their pairs (4 diagonal, 2 opposite); 3D: the
    6-neighbourhood and its 12 non-opposite pairs (Heinrich et al.'s MIND-SSC).
    """
    if ndim == 2:
        return [(-1, 0), (0, 1), (1, 0), (0, -1)], [(0, 1), (1, 2), (2, 3), (3, 0), (0, 2), (1, 3)]
    nbr = [tuple(s if k == a else 0 for k in range(3)) for a in range(3) for s in (-1, 1)]
    pairs = [(a, b) for a, b in combinations(range(6), 2) if any(p + q for p, q in zip(nbr[a], nbr[b]))]
    return nbr, pairs


def mind_ssc(x: Tensor, dilation: int = 2, sigma: float = 1.0) -> Tensor:
    """MIND-SSC of ``(N, 1, *shape)`` images, 2D or 3D.

    Patch distances (Gaussian-weighted squared differences, ``sigma``) between the pairs of
    neighbours at distance ``dilation`` (:func:`_neighbour_pairs`), divided by their mean over
    the channels (the local variance, bounded to ``[1e-3, 1e3]`` times its image mean so flat
    regions do not divide by ~0), then ``exp(−·)`` scaled so each voxel's largest channel is 1.
    Differentiable in ``x`` (the bounds are constants).

    Args:
        x: ``(N, 1, *shape)`` float images, any intensity range (array order, voxels).
        dilation: Neighbour distance in voxels.
        sigma: Gaussian patch σ in voxels (0: single-voxel patches).

    Returns:
        ``(N, P, *shape)`` in (0, 1] (``P`` = 6 in 2D, 12 in 3D) on ``x``'s grid; borders
        replicate the edge voxels.
    """
    ndim, d = x.dim() - 2, int(dilation)
    shape = x.shape[2:]
    xp = F.pad(x, [d] * (2 * ndim), mode="replicate")
    nbr, pairs = _neighbour_pairs(ndim)

    def shifted(off: tuple[int, ...]) -> Tensor:
        index = tuple(slice(d + o * d, d + o * d + n) for o, n in zip(off, shape))
        return xp[(slice(None), slice(None), *index)]

    dist = torch.cat([(shifted(nbr[a]) - shifted(nbr[b])) ** 2 for a, b in pairs], dim=1)
    dist = blur_replicate(dist, sigma)
    var = dist.mean(dim=1, keepdim=True)
    vm = var.mean()
    var = var.clamp(min=float(vm) * 1e-3 + 1e-12, max=float(vm) * 1e3 + 1e-12)
    mind = torch.exp(-dist / var)
    return mind / mind.amax(dim=1, keepdim=True)
