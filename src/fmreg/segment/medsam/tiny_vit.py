"""LiteMedSAM's image encoder: a TinyViT-5M variant for 256 x 256 inputs.

The architecture is TinyViT (Wu et al., ECCV 2022) as MobileSAM distilled it from SAM's ViT,
shrunk once more by LiteMedSAM (Ma et al., MedSAM on Laptop, 2024) for 256-pixel inputs: the
stem is two 1 x 1 convolutions (no stride), so the four stages see 256, 128, 64 and 64 pixels
per side and the neck returns SAM's ``(256, 64, 64)`` embedding.

Module and parameter names follow the released ``lite_medsam.pth`` so that its state dict
loads with ``strict=True``; the code is fmreg's own.

Shapes: images and feature maps are ``(B, C, H, W)``; token sequences are ``(B, H * W, C)``
in row-major (row, column) order.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["LayerNorm2d", "TinyViT"]


class LayerNorm2d(nn.Module):
    """Layer norm over the channels of a ``(B, C, H, W)`` map (SAM's neck uses it)."""

    def __init__(self, channels: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        # F.layer_norm normalises trailing dimensions, so move channels last and back.
        y = F.layer_norm(x.permute(0, 2, 3, 1), (x.shape[1],), self.weight, self.bias, self.eps)
        return y.permute(0, 3, 1, 2)


class ConvBN(nn.Module):
    """Bias-free convolution ``c`` followed by batch norm ``bn`` (names as in the file).

    In eval mode the batch norm is folded into the convolution's weights and bias on the
    fly: the stage-0 maps are 256 x 256 x 256 floats (67 MB), and a separate normalisation
    pass over them costs as much as a convolution on this memory-bound CPU path.
    """

    def __init__(self, c_in: int, c_out: int, kernel: int = 1, stride: int = 1, groups: int = 1):
        super().__init__()
        self.c = nn.Conv2d(c_in, c_out, kernel, stride, kernel // 2, groups=groups, bias=False)
        self.bn = nn.BatchNorm2d(c_out)

    def forward(self, x: Tensor) -> Tensor:
        if self.training:
            return self.bn(self.c(x))
        scale = self.bn.weight * torch.rsqrt(self.bn.running_var + self.bn.eps)
        weight = self.c.weight * scale.view(-1, 1, 1, 1)
        bias = self.bn.bias - self.bn.running_mean * scale
        return F.conv2d(x, weight, bias, self.c.stride, self.c.padding, groups=self.c.groups)


class Stem(nn.Module):
    """Pixel-wise lift from 3 channels to the first stage's width (no downsampling)."""

    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__()
        self.seq = nn.Sequential(ConvBN(c_in, c_out // 2), nn.GELU(), ConvBN(c_out // 2, c_out))

    def forward(self, x: Tensor) -> Tensor:
        return self.seq(x)


class MBConv(nn.Module):
    """Inverted residual block: expand 1 x 1, depthwise 3 x 3, project 1 x 1, add, GELU."""

    def __init__(self, channels: int, expand: float) -> None:
        super().__init__()
        hidden = int(channels * expand)
        self.conv1 = ConvBN(channels, hidden)
        self.conv2 = ConvBN(hidden, hidden, 3, groups=hidden)
        self.conv3 = ConvBN(hidden, channels)

    def forward(self, x: Tensor) -> Tensor:
        y = F.gelu(self.conv2(F.gelu(self.conv1(x))))
        return F.gelu(x + self.conv3(y))


class PatchMerging(nn.Module):
    """Change width (and halve the resolution when ``stride`` is 2) between two stages.

    Takes a ``(B, C, H, W)`` map or a ``(B, H * W, C)`` sequence of side ``hw``; returns a
    ``(B, H' * W', C')`` sequence.
    """

    def __init__(self, hw: tuple[int, int], c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.hw = hw
        self.conv1 = ConvBN(c_in, c_out)
        self.conv2 = ConvBN(c_out, c_out, 3, stride=stride, groups=c_out)
        self.conv3 = ConvBN(c_out, c_out)

    def forward(self, x: Tensor) -> Tensor:
        if x.ndim == 3:
            x = x.transpose(1, 2).reshape(x.shape[0], -1, *self.hw)
        x = self.conv3(F.gelu(self.conv2(F.gelu(self.conv1(x)))))
        return x.flatten(2).transpose(1, 2)


class WindowAttention(nn.Module):
    """Multi-head self-attention inside ``window x window`` token windows.

    A learned bias per head and per (|row offset|, |column offset|) between two tokens of a
    window is added to the attention logits. ``qkv`` holds, for each head in turn, its query,
    key and value channels (``key_dim`` each), as the released weights lay them out.
    """

    def __init__(self, dim: int, heads: int, window: int) -> None:
        super().__init__()
        self.heads = heads
        self.key_dim = dim // heads
        self.norm = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.attention_biases = nn.Parameter(torch.zeros(heads, window * window))
        # Offset index of every token pair: |dr| * window + |dc| (row-major offsets).
        pos = torch.arange(window)
        rows = pos.repeat_interleave(window)
        cols = pos.repeat(window)
        index = (rows[:, None] - rows[None, :]).abs() * window + (cols[:, None] - cols[None, :]).abs()
        self.register_buffer("bias_index", index, persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        """Args: x: ``(N, window**2, dim)`` tokens of N windows. Returns the same shape."""
        n, length, dim = x.shape
        qkv = self.qkv(self.norm(x)).view(n, length, self.heads, 3, self.key_dim)
        q, k, v = qkv.permute(3, 0, 2, 1, 4).unbind(0)  # each (N, heads, L, key_dim)
        bias = self.attention_biases[:, self.bias_index].to(q.dtype)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        return self.proj(out.transpose(1, 2).reshape(n, length, dim))


class Mlp(nn.Module):
    """Pre-norm feed-forward block of a TinyViT block."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(self.norm(x))))


class TinyViTBlock(nn.Module):
    """Window attention, a depthwise 3 x 3 convolution, then the MLP, on ``(B, H*W, C)``."""

    def __init__(self, dim: int, hw: tuple[int, int], heads: int, window: int, mlp_ratio: float):
        super().__init__()
        self.hw = hw
        self.window = window
        self.attn = WindowAttention(dim, heads, window)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.local_conv = ConvBN(dim, dim, 3, groups=dim)

    def forward(self, x: Tensor) -> Tensor:
        b, length, c = x.shape
        h, w = self.hw
        x = x + self._windowed_attention(x.view(b, h, w, c)).reshape(b, length, c)
        conv = self.local_conv(x.transpose(1, 2).reshape(b, c, h, w))
        x = conv.flatten(2).transpose(1, 2)
        return x + self.mlp(x)

    def _windowed_attention(self, x: Tensor) -> Tensor:
        """Attention of ``(B, H, W, C)`` tokens within windows; returns ``(B, H, W, C)``.

        Sides that are not a multiple of the window are zero-padded at the bottom/right; the
        padding tokens take part as keys (the released weights were trained that way) and are
        cut off afterwards.
        """
        b, h, w, c = x.shape
        s = self.window
        pad_h, pad_w = (-h) % s, (-w) % s
        if pad_h or pad_w:
            x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h))
        nh, nw = (h + pad_h) // s, (w + pad_w) // s
        windows = x.view(b, nh, s, nw, s, c).transpose(2, 3).reshape(b * nh * nw, s * s, c)
        out = self.attn(windows).view(b, nh, nw, s, s, c).transpose(2, 3)
        return out.reshape(b, nh * s, nw * s, c)[:, :h, :w]


class Stage(nn.Module):
    """One stage: its blocks (MBConv in stage 0, TinyViT blocks after), then the merge to the
    next stage (none after the last)."""

    def __init__(self, blocks: Sequence[nn.Module], downsample: PatchMerging | None) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.downsample = downsample

    def forward(self, x: Tensor) -> Tensor:
        for block in self.blocks:
            x = block(x)
        return x if self.downsample is None else self.downsample(x)


class TinyViT(nn.Module):
    """LiteMedSAM's image encoder.

    Args:
        image_size: Side of the square input in pixels (256).
        dims: Width of each of the four stages.
        depths: Blocks per stage.
        heads: Attention heads of each stage (stage 0 is convolutional; its entry is unused).
        windows: Attention window side of each stage.
        strides: Stride of the merge after stages 0, 1 and 2; with the unstrided stem the
            product (4) maps 256 pixels to the 64 x 64 embedding.
        mlp_ratio: MLP width over the stage width.
        expand: MBConv expansion of stage 0.
        out_channels: Channels of the embedding (SAM's 256).
    """

    def __init__(
        self,
        image_size: int = 256,
        dims: Sequence[int] = (64, 128, 160, 320),
        depths: Sequence[int] = (2, 2, 6, 2),
        heads: Sequence[int] = (2, 4, 5, 10),
        windows: Sequence[int] = (7, 7, 14, 7),
        strides: Sequence[int] = (2, 2, 1),
        mlp_ratio: float = 4.0,
        expand: float = 4.0,
        out_channels: int = 256,
    ) -> None:
        super().__init__()
        self.image_size = image_size
        self.patch_embed = Stem(3, dims[0])
        sides = [image_size]
        for stride in strides:
            sides.append(sides[-1] // stride)
        self.embedding_side = sides[-1]
        layers: list[nn.Module] = []
        for i, dim in enumerate(dims):
            hw = (sides[i], sides[i])
            merge = PatchMerging(hw, dim, dims[i + 1], strides[i]) if i + 1 < len(dims) else None
            if i == 0:
                blocks: list[nn.Module] = [MBConv(dim, expand) for _ in range(depths[0])]
            else:
                blocks = [TinyViTBlock(dim, hw, heads[i], windows[i], mlp_ratio) for _ in range(depths[i])]
            layers.append(Stage(blocks, merge))
        self.layers = nn.ModuleList(layers)
        self.neck = nn.Sequential(
            nn.Conv2d(dims[-1], out_channels, 1, bias=False),
            LayerNorm2d(out_channels),
            nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False),
            LayerNorm2d(out_channels),
        )

    def forward(self, x: Tensor) -> Tensor:
        """Args: x: ``(B, 3, S, S)`` input, ``S = image_size``. Returns ``(B, 256, S/4, S/4)``."""
        # Channels-last runs oneDNN's convolutions 2-3x faster on the full-resolution stage 0,
        # and makes the later (B, C, H, W) <-> (B, H*W, C) changes views instead of copies.
        x = self.patch_embed(x.contiguous(memory_format=torch.channels_last))
        for layer in self.layers:
            x = layer(x)
        side = self.embedding_side
        x = x.transpose(1, 2).reshape(x.shape[0], -1, side, side)
        return self.neck(x)
