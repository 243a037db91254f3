"""LiteMedSAM's prompt encoder (box prompts) and mask decoder (SAM's, unchanged).

The decoder is SAM's (Kirillov et al., ICCV 2023): output tokens (an IoU token and four mask
tokens) plus the prompt tokens attend to the image embedding and back through a two-layer
two-way transformer; each mask token's hypernetwork MLP turns it into the weights of a
linear map of the upscaled embedding, and the IoU head predicts each mask's IoU.

LiteMedSAM was trained with single-mask output, so only mask token 0 is decoded here; the
other tokens, the point and mask-prompt embeddings stay as modules so the released state dict
loads with ``strict=True``. The code is fmreg's own.

Frames: box corners are ``(x, y)`` = (column, row) in pixels of the padded square model
input (256 x 256 for LiteMedSAM). The image embedding is ``(1, C, E, E)``; a batch of ``B``
prompts decodes against it without copying it ``B`` times: every step that only depends on
the image broadcasts over the prompts.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fmreg.segment.medsam.tiny_vit import LayerNorm2d

__all__ = ["MaskDecoder", "PromptEncoder"]


class RandomFourierEncoding(nn.Module):
    """SAM's positional encoding: sin and cos of random projections of coordinates."""

    def __init__(self, features: int) -> None:
        super().__init__()
        self.register_buffer("positional_encoding_gaussian_matrix", torch.randn(2, features))

    def encode(self, xy: Tensor) -> Tensor:
        """Args: xy: ``(..., 2)`` in [0, 1] of the input's width and height.
        Returns ``(..., 2 * features)``."""
        angles = 2 * math.pi * ((2 * xy - 1) @ self.positional_encoding_gaussian_matrix)
        return torch.cat([angles.sin(), angles.cos()], dim=-1)

    def grid(self, side: int) -> Tensor:
        """Encoding of the centres of a ``side x side`` grid: ``(2 * features, side, side)``."""
        centres = (torch.arange(side, dtype=torch.float32, device=self._device()) + 0.5) / side
        ys, xs = torch.meshgrid(centres, centres, indexing="ij")
        return self.encode(torch.stack([xs, ys], dim=-1)).permute(2, 0, 1)

    def _device(self) -> torch.device:
        return self.positional_encoding_gaussian_matrix.device


class PromptEncoder(nn.Module):
    """Box prompts to sparse tokens; the constant "no mask" dense embedding.

    Args:
        dim: Token width (256).
        embedding_side: Side of the image embedding (64).
        image_size: Side of the square model input in pixels (256).
        mask_channels: Hidden channels of the (unused) mask-prompt encoder.
    """

    def __init__(self, dim: int = 256, embedding_side: int = 64, image_size: int = 256,
                 mask_channels: int = 16) -> None:
        super().__init__()
        self.image_size = image_size
        self.embedding_side = embedding_side
        self.pe_layer = RandomFourierEncoding(dim // 2)
        # 0/1: negative/positive point, 2/3: top-left/bottom-right box corner.
        self.point_embeddings = nn.ModuleList(nn.Embedding(1, dim) for _ in range(4))
        self.not_a_point_embed = nn.Embedding(1, dim)
        self.mask_downscaling = nn.Sequential(
            nn.Conv2d(1, mask_channels // 4, 2, stride=2),
            LayerNorm2d(mask_channels // 4),
            nn.GELU(),
            nn.Conv2d(mask_channels // 4, mask_channels, 2, stride=2),
            LayerNorm2d(mask_channels),
            nn.GELU(),
            nn.Conv2d(mask_channels, dim, 1),
        )
        self.no_mask_embed = nn.Embedding(1, dim)

    def embed_boxes(self, boxes: Tensor) -> Tensor:
        """Args: boxes: ``(B, 4)`` ``(x0, y0, x1, y1)`` input pixels. Returns ``(B, 2, dim)``."""
        # +0.5: a corner names a pixel, encoded at that pixel's centre.
        corners = (boxes.view(-1, 2, 2) + 0.5) / self.image_size
        tokens = self.pe_layer.encode(corners)
        corner_ids = torch.stack([self.point_embeddings[2].weight[0], self.point_embeddings[3].weight[0]])
        return tokens + corner_ids

    def dense_embedding(self) -> Tensor:
        """The "no mask prompt" embedding added to every cell: ``(1, dim, 1, 1)``."""
        return self.no_mask_embed.weight.view(1, -1, 1, 1)

    def dense_pe(self) -> Tensor:
        """Positional encoding of the embedding grid: ``(1, dim, E, E)``."""
        return self.pe_layer.grid(self.embedding_side)[None]


class Attention(nn.Module):
    """Multi-head attention whose projections may narrow the width (``downsample``)."""

    def __init__(self, dim: int, heads: int, downsample: int = 1) -> None:
        super().__init__()
        inner = dim // downsample
        self.heads = heads
        self.q_proj = nn.Linear(dim, inner)
        self.k_proj = nn.Linear(dim, inner)
        self.v_proj = nn.Linear(dim, inner)
        self.out_proj = nn.Linear(inner, dim)

    def forward(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """Args: ``(Bq, Nq, dim)``, ``(Bk, Nk, dim)``, ``(Bk, Nk, dim)``; a batch of 1
        broadcasts. Returns ``(B, Nq, dim)``."""
        q, k, v = self._heads(self.q_proj(q)), self._heads(self.k_proj(k)), self._heads(self.v_proj(v))
        batch = max(q.shape[0], k.shape[0])
        q, k, v = (t.expand(batch, -1, -1, -1) for t in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v)
        return self.out_proj(out.transpose(1, 2).flatten(2))

    def _heads(self, x: Tensor) -> Tensor:
        b, n, c = x.shape
        return x.view(b, n, self.heads, c // self.heads).transpose(1, 2)


class FeedForward(nn.Module):
    """The two-way transformer's MLP (ReLU)."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.lin1 = nn.Linear(dim, hidden)
        self.lin2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.lin2(F.relu(self.lin1(x)))


class TwoWayBlock(nn.Module):
    """Token self-attention, tokens to image, MLP on tokens, image to tokens.

    In the first block the token self-attention replaces the tokens instead of adding to
    them and sees no positional encoding (SAM's ``skip_first_layer_pe``).
    """

    def __init__(self, dim: int, heads: int, hidden: int, first: bool) -> None:
        super().__init__()
        self.first = first
        self.self_attn = Attention(dim, heads)
        self.norm1 = nn.LayerNorm(dim)
        self.cross_attn_token_to_image = Attention(dim, heads, 2)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = FeedForward(dim, hidden)
        self.norm3 = nn.LayerNorm(dim)
        self.norm4 = nn.LayerNorm(dim)
        self.cross_attn_image_to_token = Attention(dim, heads, 2)

    def forward(self, tokens: Tensor, image: Tensor, token_pe: Tensor, image_pe: Tensor):
        """Args: tokens/token_pe ``(B, T, dim)``, image ``(1 or B, N, dim)``, image_pe
        ``(1, N, dim)``. Returns the updated tokens and image tokens, batch ``B``."""
        if self.first:
            tokens = self.self_attn(tokens, tokens, tokens)
        else:
            q = tokens + token_pe
            tokens = tokens + self.self_attn(q, q, tokens)
        tokens = self.norm1(tokens)
        keys = image + image_pe
        tokens = self.norm2(tokens + self.cross_attn_token_to_image(tokens + token_pe, keys, image))
        tokens = self.norm3(tokens + self.mlp(tokens))
        image = self.norm4(image + self.cross_attn_image_to_token(keys, tokens + token_pe, tokens))
        return tokens, image


class TwoWayTransformer(nn.Module):
    """Two :class:`TwoWayBlock` and a last attention of the tokens to the image."""

    def __init__(self, dim: int = 256, heads: int = 8, hidden: int = 2048, depth: int = 2) -> None:
        super().__init__()
        self.layers = nn.ModuleList(TwoWayBlock(dim, heads, hidden, i == 0) for i in range(depth))
        self.final_attn_token_to_image = Attention(dim, heads, 2)
        self.norm_final_attn = nn.LayerNorm(dim)

    def forward(self, image: Tensor, image_pe: Tensor, tokens: Tensor) -> tuple[Tensor, Tensor]:
        """Args: image ``(1, dim, E, E)``, image_pe ``(1, dim, E, E)``, tokens ``(B, T, dim)``.
        Returns tokens ``(B, T, dim)`` and image tokens ``(B, E*E, dim)``."""
        image = image.flatten(2).transpose(1, 2)
        image_pe = image_pe.flatten(2).transpose(1, 2)
        token_pe, x = tokens, tokens
        for layer in self.layers:
            x, image = layer(x, image, token_pe, image_pe)
        attended = self.final_attn_token_to_image(x + token_pe, image + image_pe, image)
        return self.norm_final_attn(x + attended), image


class HyperMLP(nn.Module):
    """Fully connected layers with ReLU between them (SAM's MLP heads)."""

    def __init__(self, dim_in: int, hidden: int, dim_out: int, depth: int = 3) -> None:
        super().__init__()
        widths = [dim_in] + [hidden] * (depth - 1) + [dim_out]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(widths[:-1], widths[1:]))

    def forward(self, x: Tensor) -> Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x) if i == len(self.layers) - 1 else F.relu(layer(x))
        return x


class MaskDecoder(nn.Module):
    """SAM's mask decoder, returning the single-mask output (token 0).

    Args:
        dim: Transformer width (256).
        mask_tokens: Mask tokens in the weights (SAM: 1 single + 3 multimask outputs).
    """

    def __init__(self, dim: int = 256, mask_tokens: int = 4) -> None:
        super().__init__()
        self.transformer = TwoWayTransformer(dim)
        self.iou_token = nn.Embedding(1, dim)
        self.mask_tokens = nn.Embedding(mask_tokens, dim)
        self.output_upscaling = nn.Sequential(
            nn.ConvTranspose2d(dim, dim // 4, 2, stride=2),
            LayerNorm2d(dim // 4),
            nn.GELU(),
            nn.ConvTranspose2d(dim // 4, dim // 8, 2, stride=2),
            nn.GELU(),
        )
        self.output_hypernetworks_mlps = nn.ModuleList(
            HyperMLP(dim, dim, dim // 8) for _ in range(mask_tokens)
        )
        self.iou_prediction_head = HyperMLP(dim, dim, mask_tokens)

    def forward(self, image: Tensor, image_pe: Tensor, sparse: Tensor, dense: Tensor) -> tuple[Tensor, Tensor]:
        """Decode one mask per prompt.

        Args:
            image: ``(1, dim, E, E)`` image embedding.
            image_pe: ``(1, dim, E, E)`` positional encoding of the embedding grid.
            sparse: ``(B, T, dim)`` prompt tokens.
            dense: ``(1, dim, 1, 1)`` or ``(1, dim, E, E)`` dense prompt embedding.

        Returns:
            Mask logits ``(B, 4E, 4E)`` over the padded model input (256 x 256 for
            LiteMedSAM) and the predicted IoU ``(B,)``.
        """
        b = sparse.shape[0]
        out_tokens = torch.cat([self.iou_token.weight, self.mask_tokens.weight])
        tokens = torch.cat([out_tokens[None].expand(b, -1, -1), sparse], dim=1)
        src = image + dense
        tokens, src = self.transformer(src, image_pe, tokens)
        side = image.shape[-1]
        # (B, N, C) tokens viewed as a channels-last (B, C, E, E) map: no copy, and oneDNN's
        # transposed convolutions and the channel layer norm run fastest in that layout.
        src = src.transpose(1, 2).reshape(b, -1, side, side)
        upscaled = self.output_upscaling(src)  # (B, dim/8, 4E, 4E), channels-last
        weights = self.output_hypernetworks_mlps[0](tokens[:, 1])  # (B, dim/8)
        pixels = upscaled.permute(0, 2, 3, 1).reshape(b, -1, weights.shape[1])  # (B, 16E², dim/8)
        masks = torch.bmm(pixels, weights[:, :, None]).view(b, *upscaled.shape[-2:])
        iou = self.iou_prediction_head(tokens[:, 0])[:, 0]
        return masks, iou
