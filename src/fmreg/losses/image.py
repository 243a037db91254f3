"""Image dissimilarity terms; images are ``(*shape)`` or batch-first ``(B, 1, *shape)`` tensors."""

from __future__ import annotations

from typing import Sequence

import torch.nn.functional as F
from torch import Tensor, nn

from fmreg.losses.base import LossRecord


def mse(fixed: Tensor, warped: Tensor) -> Tensor:
    """Mean squared intensity difference (intensities normalised alike, e.g. to ``[0, 1]``)."""
    return ((fixed - warped) ** 2).mean()


def lncc(a: Tensor, b: Tensor, window: Sequence[int], eps: float = 1e-3) -> Tensor:
    """Mean local normalised cross-correlation, squared form, in ``[0, 1]``.

    Args:
        a, b: ``(*shape)`` images (2D or 3D), any monotone intensity relation.
        window: Box window edge per array axis, voxels (odd).
        eps: Added to the variance product, so flat regions count as uncorrelated.

    Returns:
        Scalar; 1 where ``b`` is an affine function of ``a`` in every window.
    """
    pool = F.avg_pool3d if a.dim() == 3 else F.avg_pool2d
    k = tuple(int(w) for w in window)
    pad = tuple(w // 2 for w in k)

    def mean(t: Tensor) -> Tensor:
        return pool(t[None, None], k, stride=1, padding=pad, count_include_pad=False)[0, 0]

    ma, mb = mean(a), mean(b)
    cov = mean(a * b) - ma * mb
    va = (mean(a * a) - ma * ma).clamp_min(0)
    vb = (mean(b * b) - mb * mb).clamp_min(0)
    return (cov * cov / (va * vb + eps)).mean()


def correlation(a: Tensor, b: Tensor) -> float:
    """Pearson correlation of two images of the same shape (0 when one is constant)."""
    a, b = a.flatten() - a.mean(), b.flatten() - b.mean()
    return float((a * b).sum() / (a.norm() * b.norm()).clamp_min(1e-12))


class MSE(nn.Module):
    """``scale · mse``; the record's ``mse`` term is the scaled value that enters the total."""

    def __init__(self, scale: float = 1.0) -> None:
        super().__init__()
        self.scale = scale

    def forward(self, fixed: Tensor, warped: Tensor) -> LossRecord:
        value = mse(fixed, warped) * self.scale
        return LossRecord(value, {"mse": value})


class LNCC(nn.Module):
    """``1 − lncc``; the record's ``lncc`` term is the similarity itself."""

    def __init__(self, window: Sequence[int], eps: float = 1e-3) -> None:
        super().__init__()
        self.window, self.eps = tuple(window), eps

    def forward(self, fixed: Tensor, warped: Tensor) -> LossRecord:
        sim = lncc(fixed, warped, self.window, self.eps)
        return LossRecord(1 - sim, {"lncc": sim})
