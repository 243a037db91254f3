"""The mask-guided registration network of paper 001 (Xu et al., IPMI 2025), 2D and 3D.

Four convolutional encoders — moving image, fixed image, moving masks (``K`` channels), fixed
masks (``K`` channels) — give features of widths ``widths`` (default 8/16/32/64) at 1, ½, ¼, ⅛
resolution (instance norm, leaky ReLU). Decoding runs coarse to fine; at each level:

1. the moving image and moving mask features are warped by the field so far (upsampled);
2. a **cross-fusion block** fuses the four streams: cross-attention between the two images'
   features (each attends over the other) and between the two masks' features, then fusion
   attention where the image stream attends over the mask stream, and a convolution of the
   concatenated streams (``fusion="attention"``); or only that convolution of the four
   concatenated streams (``fusion="conv"``, the ablation);
3. a registration head predicts a residual displacement ``du`` (zero-initialised last conv),
   composed with the coarser field: ``T_l = T_{l+1} ∘ (id + du)``, i.e.
   ``u_l(x) = du(x) + u_{l+1}(x + du(x))``.

Attention is affordable by construction: it runs only at the ``attention_levels`` coarsest
levels (finer ones use the convolutional fusion), and keys/values are average-pooled to at
most ``max_keys`` tokens (queries stay at full level resolution), so one attention costs
``N_level × min(N_level, max_keys)`` scores.

Frames: displacements are in the ``NORMALIZED`` frame of the (common) input grid — ``grid_sample``
coordinates, ``align_corners=True``, components ``x, y[, z]`` (the reverse of the array axes);
normalized units do not depend on resolution, so fields are resized between levels unscaled.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fmreg.core.grid import Grid
from fmreg.core.sampling import identity_points, sample_normalized, sample_vectors
from fmreg.transforms.base import Transform
from fmreg.transforms.displacement import DisplacementTransform
from fmreg.transforms.velocity import resize_vectors, scaling_and_squaring

FUSIONS = ("attention", "conv")


def _conv(dimension: int):
    return nn.Conv2d if dimension == 2 else nn.Conv3d


def conv_block(dimension: int, c_in: int, c_out: int, stride: int = 1) -> nn.Sequential:
    """Two 3×3(×3) convolutions, each followed by instance norm and leaky ReLU."""
    conv = _conv(dimension)
    norm = nn.InstanceNorm2d if dimension == 2 else nn.InstanceNorm3d
    return nn.Sequential(
        conv(c_in, c_out, 3, stride=stride, padding=1), norm(c_out, affine=True), nn.LeakyReLU(0.2),
        conv(c_out, c_out, 3, padding=1), norm(c_out, affine=True), nn.LeakyReLU(0.2),
    )


class Encoder(nn.Module):
    """Features at 1, ½, ¼, … resolution: ``(B, widths[l], *ceil(shape / 2**l))`` per level."""

    def __init__(self, dimension: int, in_channels: int, widths: Sequence[int]) -> None:
        super().__init__()
        chans = [in_channels, *widths]
        self.blocks = nn.ModuleList(
            conv_block(dimension, chans[i], chans[i + 1], stride=1 if i == 0 else 2) for i in range(len(widths)))

    def forward(self, x: Tensor) -> list[Tensor]:
        out = []
        for block in self.blocks:
            x = block(x)
            out.append(x)
        return out


def _points(shape: Sequence[int], like: Tensor) -> Tensor:
    """``identity_points(shape)`` on ``like``'s device and dtype: ``(1, *shape, ndim)``."""
    return identity_points(tuple(shape), like.dtype).to(like.device)


class PooledCrossAttention(nn.Module):
    """Pre-norm transformer cross-attention: queries of one stream attend over another's tokens.

    Keys/values are the context features average-pooled to at most ``max_keys`` tokens
    (``⌊max_keys^(1/d)⌋`` per axis); a linear map of each token's normalized position is added
    to queries and keys, as attention alone is blind to where a token lies.

    Args:
        dimension: 2 or 3.
        channels: Feature channels of both streams.
        max_keys: Upper bound on key/value tokens.
    """

    def __init__(self, dimension: int, channels: int, max_keys: int = 512) -> None:
        super().__init__()
        self.dimension = dimension
        self.side = max(1, int(max_keys ** (1.0 / dimension) + 1e-9))
        self.position = nn.Linear(dimension, channels)
        self.norm_q, self.norm_kv = nn.LayerNorm(channels), nn.LayerNorm(channels)
        self.attention = nn.MultiheadAttention(channels, max(1, channels // 16), batch_first=True)
        self.mlp = nn.Sequential(nn.LayerNorm(channels), nn.Linear(channels, 2 * channels), nn.LeakyReLU(0.2),
                                 nn.Linear(2 * channels, channels))

    def key_shape(self, shape: Sequence[int]) -> tuple[int, ...]:
        return tuple(min(int(n), self.side) for n in shape)

    def forward(self, query: Tensor, context: Tensor) -> Tensor:
        """``(B, C, *s)`` query features updated from ``(B, C, *s')`` context features (same extent)."""
        shape, kshape = query.shape[2:], self.key_shape(context.shape[2:])
        pool = F.adaptive_avg_pool2d if self.dimension == 2 else F.adaptive_avg_pool3d
        ctx = pool(context, kshape) if tuple(context.shape[2:]) != kshape else context
        q = query.flatten(2).transpose(1, 2)  # (B, N, C)
        kv = ctx.flatten(2).transpose(1, 2)
        pq = self.position(_points(shape, query).flatten(1, -2))
        pk = self.position(_points(kshape, query).flatten(1, -2))
        kv_n = self.norm_kv(kv)
        att, _ = self.attention(self.norm_q(q) + pq, kv_n + pk, kv_n, need_weights=False)
        x = q + att
        x = x + self.mlp(x)
        return x.transpose(1, 2).reshape(query.shape)


class ConvFusion(nn.Module):
    """Concatenate the four streams and convolve (the ablation's fusion)."""

    def __init__(self, dimension: int, channels: int) -> None:
        super().__init__()
        self.block = conv_block(dimension, 4 * channels, channels)

    def forward(self, moving: Tensor, fixed: Tensor, moving_mask: Tensor, fixed_mask: Tensor) -> Tensor:
        return self.block(torch.cat([moving, fixed, moving_mask, fixed_mask], dim=1))


class AttentionFusion(nn.Module):
    """The cross-fusion block: image↔image and mask↔mask cross-attention, then image→mask fusion.

    Args:
        dimension: 2 or 3.
        channels: Width of every stream at this level.
        max_keys: Key/value token bound of each attention.
    """

    def __init__(self, dimension: int, channels: int, max_keys: int = 512) -> None:
        super().__init__()
        conv = _conv(dimension)

        def attention() -> PooledCrossAttention:
            return PooledCrossAttention(dimension, channels, max_keys)

        self.fixed_from_moving, self.moving_from_fixed = attention(), attention()
        self.fixed_mask_from_moving, self.moving_mask_from_fixed = attention(), attention()
        self.image_from_mask = attention()
        self.image_merge = conv(2 * channels, channels, 1)
        self.mask_merge = conv(2 * channels, channels, 1)
        self.out = conv_block(dimension, 2 * channels, channels)

    def forward(self, moving: Tensor, fixed: Tensor, moving_mask: Tensor, fixed_mask: Tensor) -> Tensor:
        f, m = self.fixed_from_moving(fixed, moving), self.moving_from_fixed(moving, fixed)
        fs, ms = self.fixed_mask_from_moving(fixed_mask, moving_mask), self.moving_mask_from_fixed(moving_mask, fixed_mask)
        image = self.image_merge(torch.cat([m, f], dim=1))
        mask = self.mask_merge(torch.cat([ms, fs], dim=1))
        image = self.image_from_mask(image, mask)
        return self.out(torch.cat([image, mask], dim=1))


def registration_head(dimension: int, channels: int) -> nn.Sequential:
    """conv → leaky ReLU → conv to ``dimension`` channels; the last conv is zero (identity start)."""
    conv = _conv(dimension)
    last = conv(channels, dimension, 3, padding=1)
    nn.init.zeros_(last.weight)
    nn.init.zeros_(last.bias)
    return nn.Sequential(conv(channels, channels, 3, padding=1), nn.LeakyReLU(0.2), last)


@dataclass
class MaskGuidedOutput:
    """What :class:`MaskGuidedNet` returns with ``return_features=True``.

    Attributes:
        transform: ``T`` with ``moving ∘ T ≈ fixed`` (a batched :class:`DisplacementTransform`).
        displacement: ``(B, ndim, *shape)`` its displacement, ``NORMALIZED`` units, ``x, y[, z]``.
        fixed_features: Per level (finest first), ``(B, widths[l], *shape_l)`` fixed-image
            encoder features.
        warped_features: Per level, ``(B, widths[l], *shape_l)`` moving-image encoder features
            warped by the final ``T`` onto the fixed grid (for the prototype losses).
    """

    transform: Transform
    displacement: Tensor
    fixed_features: list[Tensor]
    warped_features: list[Tensor]


class MaskGuidedNet(nn.Module):
    """Mask-guided registration network: ``forward(moving, fixed, moving_masks, fixed_masks) -> T``.

    Args:
        dimension: 2 or 3.
        mask_channels: ``K``, mask channels of each mask input (pair ``k`` in channel ``k``).
        widths: Encoder widths per level, finest first (level ``l`` at ``1/2**l`` resolution).
        fusion: ``"attention"`` (cross-fusion transformer) or ``"conv"`` (concatenate + conv).
        attention_levels: With ``"attention"``, how many of the coarsest levels use it.
        max_keys: Key/value token bound of each attention.
        image_channels: Channels per image.
        squaring_steps: 0: each level's head outputs a displacement (the published code's);
            otherwise a stationary velocity integrated by this many scaling-and-squaring
            steps, so every level's update, and their composition, is diffeomorphic up to
            interpolation error.
    """

    def __init__(self, dimension: int, mask_channels: int, widths: Sequence[int] = (8, 16, 32, 64),
                 fusion: str = "attention", attention_levels: int = 2, max_keys: int = 512,
                 image_channels: int = 1, squaring_steps: int = 0) -> None:
        super().__init__()
        if dimension not in (2, 3):
            raise ValueError(f"dimension must be 2 or 3, got {dimension}")
        if fusion not in FUSIONS:
            raise ValueError(f"fusion must be one of {FUSIONS}, got {fusion!r}")
        if mask_channels < 1 or not widths:
            raise ValueError(f"need mask_channels >= 1 and at least one width, got {mask_channels}, {widths}")
        self.dimension, self.mask_channels, self.image_channels = dimension, mask_channels, image_channels
        if squaring_steps < 0:
            raise ValueError(f"squaring_steps must be >= 0, got {squaring_steps}")
        self.widths, self.fusion = tuple(int(w) for w in widths), fusion
        self.squaring_steps = int(squaring_steps)
        levels = len(self.widths)
        self.attention_levels = min(attention_levels, levels) if fusion == "attention" else 0
        self.moving_encoder = Encoder(dimension, image_channels, self.widths)
        self.fixed_encoder = Encoder(dimension, image_channels, self.widths)
        self.moving_mask_encoder = Encoder(dimension, mask_channels, self.widths)
        self.fixed_mask_encoder = Encoder(dimension, mask_channels, self.widths)
        self.fusions = nn.ModuleList(
            AttentionFusion(dimension, w, max_keys) if level >= levels - self.attention_levels else ConvFusion(dimension, w)
            for level, w in enumerate(self.widths))
        self.heads = nn.ModuleList(registration_head(dimension, w) for w in self.widths)

    def check_inputs(self, moving: Tensor, fixed: Tensor, moving_masks: Tensor, fixed_masks: Tensor) -> None:
        """Raise ValueError naming what differs between the inputs and what the model expects."""
        d = self.dimension
        for name, t in (("moving image", moving), ("fixed image", fixed), ("moving masks", moving_masks),
                        ("fixed masks", fixed_masks)):
            if t.dim() != d + 2:
                raise ValueError(f"{name} must be (B, C, *shape) with {d} spatial axes, got shape {tuple(t.shape)}")
        for name, t in (("moving image", moving), ("fixed image", fixed)):
            if t.shape[1] != self.image_channels:
                raise ValueError(f"{name} has {t.shape[1]} channels, the model expects {self.image_channels}")
        for name, t in (("moving masks", moving_masks), ("fixed masks", fixed_masks)):
            if t.shape[1] != self.mask_channels:
                raise ValueError(f"{name} have {t.shape[1]} channels, the model expects {self.mask_channels}")
        if moving.shape != fixed.shape:
            raise ValueError(f"moving image {tuple(moving.shape)} and fixed image {tuple(fixed.shape)} differ in shape")
        for name, t, img in (("moving masks", moving_masks, moving), ("fixed masks", fixed_masks, fixed)):
            if t.shape[0] != img.shape[0] or t.shape[2:] != img.shape[2:]:
                raise ValueError(f"{name} have batch/grid {(t.shape[0], *t.shape[2:])}, "
                                 f"their image {(img.shape[0], *img.shape[2:])}")

    def forward(self, moving: Tensor, fixed: Tensor, moving_masks: Tensor, fixed_masks: Tensor,
                return_features: bool = False) -> Transform | MaskGuidedOutput:
        """Register ``moving`` to ``fixed`` guided by matched masks.

        Args:
            moving, fixed: ``(B, C, *shape)`` images on one grid.
            moving_masks, fixed_masks: ``(B, K, *shape)`` masks in ``[0, 1]`` on that grid;
                channel ``k`` of both is matched ROI pair ``k`` (empty channels: no pair).
            return_features: Also return the per-level features for the prototype losses.

        Returns:
            ``T`` in the ``NORMALIZED`` frame of ``Grid(shape)`` (batch-first displacement), or a
            :class:`MaskGuidedOutput` with it.
        """
        self.check_inputs(moving, fixed, moving_masks, fixed_masks)
        img_m, img_f = self.moving_encoder(moving), self.fixed_encoder(fixed)
        msk_m, msk_f = self.moving_mask_encoder(moving_masks), self.fixed_mask_encoder(fixed_masks)
        flow = None  # (B, *shape_l, ndim) normalized displacement so far
        for level in reversed(range(len(self.widths))):
            shape_l = img_f[level].shape[2:]
            fm, sm = img_m[level], msk_m[level]
            if flow is not None:
                flow = resize_vectors(flow, shape_l)
                pts = _points(shape_l, flow) + flow
                fm = sample_normalized(fm, pts, padding="border")
                sm = sample_normalized(sm, pts, padding="border")
            fused = self.fusions[level](fm, img_f[level], sm, msk_f[level])
            du = self.heads[level](fused).movedim(1, -1)
            if self.squaring_steps:
                du = scaling_and_squaring(du, self.squaring_steps)
            flow = du if flow is None else du + sample_vectors(flow, _points(shape_l, du) + du)
        flow = resize_vectors(flow, moving.shape[2:])
        displacement = flow.movedim(-1, 1)
        transform = DisplacementTransform(displacement, Grid(tuple(moving.shape[2:])))
        if not return_features:
            return transform
        warped = []
        for feats in img_m:
            shape_l = feats.shape[2:]
            pts = _points(shape_l, flow) + resize_vectors(flow, shape_l)
            warped.append(sample_normalized(feats, pts, padding="border"))
        return MaskGuidedOutput(transform, displacement, list(img_f), warped)
