"""The uniGradICON network: U-Nets composed coarse to fine (Tian et al. 2024; GradICON, CVPR 2023).

``GradICON(dimension)`` is, like uniGradICON's ``regis_net``, four U-Net steps:

    step 1 at 1/4 resolution → step 2 at 1/2 → step 3 at full → step 4 at full,

each step registering the moving image warped by the steps before it, and the result being
their composition. The modules nest exactly as icon_registration's ``TwoStepRegistration``
(``netPhi``, ``netPsi``), ``DownsampleRegistration`` and ``FunctionFromVectorField`` (``net``)
do, so a released ``Step_2_final.trch`` (a ``state_dict`` of ``regis_net``) loads into
:attr:`GradICON.regis_net` with ``strict=True``.

Frames: icon's maps are in ``[0, 1]`` per array axis, components in array order; fmreg's
transforms are in the ``NORMALIZED`` frame (``[-1, 1]``, components ``x, y[, z]``). A U-Net
displacement ``u`` becomes ``2 · flip(u)`` (:func:`icon_to_normalized`): the same map, so the
released weights mean what they meant.
"""

from __future__ import annotations

from typing import Sequence

import torch.nn.functional as F
from torch import Tensor, nn

from fmreg.core.grid import Grid
from fmreg.core.sampling import sample_normalized
from fmreg.nn.unet import UNIGRADICON_DOWN, UNIGRADICON_UP, UNet
from fmreg.transforms.base import Transform
from fmreg.transforms.displacement import DisplacementTransform
from fmreg.transforms.sequential import SequentialTransform


def icon_to_normalized(u: Tensor) -> Tensor:
    """``(B, d, *shape)`` displacement in icon units → fmreg ``NORMALIZED`` units (x first)."""
    return 2.0 * u.flip(1)


def warp_batch(image: Tensor, transform: Transform) -> Tensor:
    """``(B, C, *shape)`` images sampled at ``T(x)`` on their own grid (border values outside)."""
    return sample_normalized(image, transform.normalized_points(image.shape[2:]), padding="border")


class VectorFieldStep(nn.Module):
    """A U-Net whose displacement is the transform (icon's ``FunctionFromVectorField``)."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, moving: Tensor, fixed: Tensor) -> Transform:
        u = icon_to_normalized(self.net(moving, fixed))
        return DisplacementTransform(u, Grid(tuple(moving.shape[2:])))


class DownsampleStep(nn.Module):
    """Runs ``net`` on both images average-pooled by 2 (icon's ``DownsampleRegistration``).

    The pooled images are taken to span the same extent as the full ones, as icon does, so
    the returned transform applies at full resolution unchanged.
    """

    def __init__(self, net: nn.Module, dimension: int) -> None:
        super().__init__()
        self.net = net
        self.dimension = dimension

    def forward(self, moving: Tensor, fixed: Tensor) -> Transform:
        pool = F.avg_pool2d if self.dimension == 2 else F.avg_pool3d
        return self.net(pool(moving, 2, ceil_mode=True), pool(fixed, 2, ceil_mode=True))


class TwoStep(nn.Module):
    """``netPhi`` first, then ``netPsi`` on the moving image warped by it; ``T = φ ∘ ψ``."""

    def __init__(self, netPhi: nn.Module, netPsi: nn.Module) -> None:  # noqa: N803 (icon's names)
        super().__init__()
        self.netPhi = netPhi
        self.netPsi = netPsi

    def forward(self, moving: Tensor, fixed: Tensor) -> Transform:
        phi = self.netPhi(moving, fixed)
        psi = self.netPsi(warp_batch(moving, phi), fixed)
        return SequentialTransform(psi, phi)


def build_regis_net(dimension: int, down: Sequence[int] = UNIGRADICON_DOWN, up: Sequence[int] = UNIGRADICON_UP,
                    levels: int = 3, last_step: bool = True, input_channels: int = 1) -> nn.Module:
    """uniGradICON's ``regis_net``: ``levels`` resolutions (coarsest at ``1/2**(levels-1)``) plus
    an optional last full-resolution step."""

    def unet() -> VectorFieldStep:
        return VectorFieldStep(UNet(dimension, down, up, input_channels))

    net: nn.Module = unet()
    for _ in range(levels - 1):
        net = TwoStep(DownsampleStep(net, dimension), unet())
    if last_step:
        net = TwoStep(net, unet())
    return net


class GradICON(nn.Module):
    """Registration network: ``forward(moving, fixed)`` returns ``T`` with ``moving ∘ T ≈ fixed``.

    Args:
        dimension: 2 or 3.
        down, up: U-Net widths (uniGradICON: :data:`~fmreg.nn.unet.UNIGRADICON_DOWN` / ``_UP``).
        levels: Resolutions of the coarse-to-fine cascade (uniGradICON: 3).
        last_step: The fourth, full-resolution step of uniGradICON's final model.
        input_channels: Channels per image.
    """

    def __init__(self, dimension: int, down: Sequence[int] = UNIGRADICON_DOWN, up: Sequence[int] = UNIGRADICON_UP,
                 levels: int = 3, last_step: bool = True, input_channels: int = 1) -> None:
        super().__init__()
        self.dimension = dimension
        self.regis_net = build_regis_net(dimension, down, up, levels, last_step, input_channels)

    def forward(self, moving: Tensor, fixed: Tensor) -> Transform:
        """``T`` for ``(B, C, *shape)`` images, in the ``NORMALIZED`` frame of their (common) grid."""
        return self.regis_net(moving, fixed)
