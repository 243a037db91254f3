"""Image dissimilarity terms; images are ``(*shape)`` or batch-first ``(B, 1, *shape)`` tensors."""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fmreg.losses.base import LossRecord


def mse(fixed: Tensor, warped: Tensor, weight: Tensor | None = None) -> Tensor:
    """Mean squared intensity difference (intensities normalised alike, e.g. to ``[0, 1]``),
    weighted by ``weight`` (same shape, non-negative) when given."""
    if weight is None:
        return ((fixed - warped) ** 2).mean()
    weight = weight.expand_as(fixed)  # a spatial weight serves every channel of a descriptor stack
    return (weight * (fixed - warped) ** 2).sum() / weight.sum().clamp_min(1e-12)


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


class _SymmetricConvolution(torch.autograd.Function):
    """Depthwise convolution with a symmetric kernel and zero "same" padding.

    Such a convolution is its own adjoint, so the backward pass is one more forward
    convolution: several times faster on the CPU than the generic convolution backward.
    """

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor) -> Tensor:
        ctx.save_for_backward(weight)
        return _depthwise(x, weight)

    @staticmethod
    def backward(ctx, grad: Tensor):
        (weight,) = ctx.saved_tensors
        return _depthwise(grad, weight), None


def _depthwise(x: Tensor, weight: Tensor) -> Tensor:
    conv = F.conv2d if x.dim() == 4 else F.conv3d
    return conv(x, weight, padding="same", groups=x.shape[1])


def gaussian_blur(x: Tensor, sigma: float) -> Tensor:
    """Separable Gaussian blur of ``(B, C, *shape)`` images, zero padding, kernel ``4σ + 1`` wide."""
    radius = int(2 * sigma)
    t = torch.arange(-radius, radius + 1, dtype=x.dtype, device=x.device)
    kernel = torch.exp(-0.5 * (t / sigma) ** 2)
    kernel = kernel / kernel.sum()
    ndim, channels = x.dim() - 2, x.shape[1]
    for axis in range(ndim):
        shape = [1] * ndim
        shape[axis] = kernel.numel()
        weight = kernel.reshape(1, 1, *shape).expand(channels, 1, *shape).contiguous()
        x = _SymmetricConvolution.apply(x, weight)
    return x


def gaussian_lncc(a: Tensor, b: Tensor, sigma: float = 5.0, squared: bool = False, eps: float = 1e-5) -> Tensor:
    """Mean local normalised cross-correlation with a Gaussian window (uniGradICON's ``LNCC``).

    Args:
        a, b: ``(B, C, *shape)`` images.
        sigma: Window standard deviation, voxels.
        squared: Mean of LNCC² (sign-blind) instead of LNCC.
        eps: Added to each local variance.

    Returns:
        Scalar in ``[-1, 1]`` (``[0, 1]`` squared); 1 where ``b`` is an increasing affine function
        of ``a`` in every window.
    """
    ma, mb = gaussian_blur(a, sigma), gaussian_blur(b, sigma)
    cov = gaussian_blur(a * b, sigma) - ma * mb
    va = torch.relu(gaussian_blur(a * a, sigma) - ma * ma) + eps
    vb = torch.relu(gaussian_blur(b * b, sigma) - mb * mb) + eps
    cc = cov / torch.sqrt(va * vb)
    return (cc * cc if squared else cc).mean()


def correlation(a: Tensor, b: Tensor, weight: Tensor | None = None) -> float:
    """Pearson correlation of two images of the same shape (0 when one is constant), weighted by
    ``weight`` (same shape, non-negative) when given."""
    if weight is None:
        a, b = a.flatten() - a.mean(), b.flatten() - b.mean()
        return float((a * b).sum() / (a.norm() * b.norm()).clamp_min(1e-12))
    w = weight.flatten() / weight.sum().clamp_min(1e-12)
    a, b = a.flatten(), b.flatten()
    a, b = a - (w * a).sum(), b - (w * b).sum()
    return float((w * a * b).sum() / ((w * a * a).sum() * (w * b * b).sum()).sqrt().clamp_min(1e-12))


class MSE(nn.Module):
    """``scale · mse``; the record's ``mse`` term is the scaled value that enters the total."""

    def __init__(self, scale: float = 1.0) -> None:
        super().__init__()
        self.scale = scale

    def forward(self, fixed: Tensor, warped: Tensor, weight: Tensor | None = None) -> LossRecord:
        value = mse(fixed, warped, weight) * self.scale
        return LossRecord(value, {"mse": value})


class MINDSSC(nn.Module):
    """Mean squared difference of the MIND-SSC descriptors (:func:`~fmreg.core.descriptors.mind_ssc`)
    of ``(B, 1, *shape)`` images: a structure-only dissimilarity for pairs whose contrasts
    differ; the record's ``mind_ssc`` term is the value."""

    def __init__(self, dilation: int = 2, sigma: float = 1.0) -> None:
        super().__init__()
        self.dilation, self.sigma = dilation, sigma

    def forward(self, warped: Tensor, fixed: Tensor) -> LossRecord:
        from fmreg.core.descriptors import mind_ssc

        value = ((mind_ssc(warped, self.dilation, self.sigma) - mind_ssc(fixed, self.dilation, self.sigma)) ** 2).mean()
        return LossRecord(value, {"mind_ssc": value})


class LNCC(nn.Module):
    """``1 − lncc``; the record's ``lncc`` term is the similarity itself."""

    def __init__(self, window: Sequence[int], eps: float = 1e-3) -> None:
        super().__init__()
        self.window, self.eps = tuple(window), eps

    def forward(self, fixed: Tensor, warped: Tensor) -> LossRecord:
        sim = lncc(fixed, warped, self.window, self.eps)
        return LossRecord(1 - sim, {"lncc": sim})


class GaussianLNCC(nn.Module):
    """``1 − gaussian_lncc``; the record's ``lncc`` term is the similarity itself."""

    def __init__(self, sigma: float = 5.0, squared: bool = False) -> None:
        super().__init__()
        self.sigma, self.squared = sigma, squared

    def forward(self, warped: Tensor, fixed: Tensor) -> LossRecord:
        sim = gaussian_lncc(warped, fixed, self.sigma, self.squared)
        return LossRecord(1 - sim, {"lncc": sim})
