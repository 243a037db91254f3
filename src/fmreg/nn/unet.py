"""The U-Net of uniGradICON (``tallUNet2`` of icon_registration), 2D and 3D, any width.

Down path: stride-2 3×3(×3) convolutions after a leaky ReLU, each added to the average-pooled
input (a residual, channels cropped or zero-padded). Up path: stride-2 4×4(×4) transposed
convolutions added to the linearly upsampled input, then BatchNorm and the skip connection.
The last convolution is zero-initialised and its output divided by 10, so an untrained network
returns the identity. Parameter names follow icon_registration's (``downConvs``, ``upConvs``,
``batchNorms``, ``lastConv``) so that uniGradICON's released weights load with ``strict=True``.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

#: uniGradICON's widths: down 2-16-32-64-256-512 (the first is 2 × input channels), up 16-32-64-128-256.
UNIGRADICON_DOWN = (16, 32, 64, 256, 512)
UNIGRADICON_UP = (16, 32, 64, 128, 256)


def _match_channels(x: Tensor, channels: int) -> Tensor:
    """Keep the first ``channels`` channels, or zero-pad in front up to ``channels``."""
    x = x[:, :channels]
    missing = channels - x.shape[1]
    if missing <= 0:
        return x
    return torch.cat([x.new_zeros((x.shape[0], missing, *x.shape[2:])), x], dim=1)


class UNet(nn.Module):
    """Displacement-predicting U-Net.

    Args:
        dimension: 2 or 3 spatial dimensions.
        down: Output channels of each down convolution (``len(down)`` levels).
        up: Output channels of each up convolution, finest first (same length as ``down``).
        input_channels: Channels per image (the network sees ``moving ⊕ fixed``).
    """

    def __init__(self, dimension: int, down: Sequence[int] = UNIGRADICON_DOWN, up: Sequence[int] = UNIGRADICON_UP,
                 input_channels: int = 1) -> None:
        super().__init__()
        if dimension not in (2, 3) or len(down) != len(up) or not down:
            raise ValueError(f"UNet needs dimension 2 or 3 and equal-length down/up widths, got {dimension}, {down}, {up}")
        conv, tconv, norm = (nn.Conv2d, nn.ConvTranspose2d, nn.BatchNorm2d) if dimension == 2 else (
            nn.Conv3d, nn.ConvTranspose3d, nn.BatchNorm3d)
        self.dimension = dimension
        widths = [2 * input_channels, *down]
        up_in = [widths[d + 1] + (up[d + 1] if d + 1 < len(up) else 0) for d in range(len(up))]
        self.downConvs = nn.ModuleList(conv(widths[d], widths[d + 1], 3, stride=2, padding=1) for d in range(len(down)))
        self.upConvs = nn.ModuleList(tconv(up_in[d], up[d], 4, stride=2, padding=1) for d in range(len(up)))
        self.batchNorms = nn.ModuleList(norm(c) for c in up)
        self.lastConv = conv(widths[0] + up[0], dimension, 3, padding=1)
        nn.init.zeros_(self.lastConv.weight)
        nn.init.zeros_(self.lastConv.bias)

    def forward(self, moving: Tensor, fixed: Tensor) -> Tensor:
        """Displacement of ``moving`` towards ``fixed``.

        Args:
            moving, fixed: ``(B, C, *shape)`` images.

        Returns:
            ``(B, dimension, *shape)`` displacement in icon units: ``[0, 1]`` per array axis,
            channels in array-axis order (see :mod:`fmreg.nn.gradicon` for the conversion).
        """
        pool = F.avg_pool2d if self.dimension == 2 else F.avg_pool3d
        mode = "bilinear" if self.dimension == 2 else "trilinear"
        x = torch.cat([moving, fixed], dim=1)
        skips = []
        for conv in self.downConvs:
            skips.append(x)
            y = conv(F.leaky_relu(x))
            x = y + _match_channels(pool(x, 2, ceil_mode=True), y.shape[1])
        for depth in reversed(range(len(self.upConvs))):
            y = self.upConvs[depth](F.leaky_relu(x))
            x = y + F.interpolate(_match_channels(x, y.shape[1]), scale_factor=2, mode=mode, align_corners=False)
            x = self.batchNorms[depth](x)
            skip = skips[depth]
            x = x[(slice(None), slice(None), *[slice(0, n) for n in skip.shape[2:]])]
            x = torch.cat([x, skip], dim=1)
        return self.lastConv(x) / 10
