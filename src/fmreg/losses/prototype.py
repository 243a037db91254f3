"""ROI prototype losses of mask-guided registration (paper 001, Xu et al., IPMI 2025).

A *prototype* is the masked average of a feature map over one ROI (masked average pooling, as
paper 002's Eq. 5 and :func:`fmreg.correspond.prototypes.roi_prototypes`, generalised here to
batched 2D/3D features and to soft or empty masks). ROI ``k`` of the fixed image and ROI ``k``
of the warped moving image are a matched pair (mask channel ``k`` of both mask inputs).

Tensors are batch-first and in array order: features ``(B, C, *shape)``, masks ``(B, K, *shape)``
with values in ``[0, 1]``; prototypes ``(B, K, C)`` (feature units); validity ``(B, K)`` bool.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fmreg.losses.base import LossRecord


def level_masks(masks: Tensor, shape: Sequence[int]) -> Tensor:
    """Masks resampled to a feature grid as coverage fractions (``M^res`` of paper 002, Eq. 5).

    Shrinking is area interpolation, so a mask smaller than a feature cell keeps a positive
    weight where it lies instead of vanishing; enlarging is nearest-neighbour. This is the rule
    of :func:`fmreg.correspond.prototypes.resize_masks`, for any batch and 2D or 3D.

    Args:
        masks: ``(B, K, *S)`` soft masks in ``[0, 1]``, array order.
        shape: Feature grid shape covering the same field of view.

    Returns:
        ``(B, K, *shape)`` float weights in ``[0, 1]``.
    """
    shape = tuple(int(s) for s in shape)
    m = masks.float()
    if tuple(m.shape[2:]) == shape or m.shape[1] == 0:
        return m if tuple(m.shape[2:]) == shape else m.new_zeros((*m.shape[:2], *shape))
    shrink = all(s <= n for s, n in zip(shape, m.shape[2:]))
    return F.interpolate(m, size=shape, mode="area" if shrink else "nearest")


def prototypes(features: Tensor, masks: Tensor, eps: float = 1e-6) -> tuple[Tensor, Tensor]:
    """Masked average pooling: ``p_bk = Σ_n M_bk(n) F_b(n) / Σ_n M_bk(n)``.

    Args:
        features: ``(B, C, *shape)`` features.
        masks: ``(B, K, *S)`` soft masks of the same field of view, any resolution (resampled by
            :func:`level_masks`).
        eps: Total mask weight (in feature cells) below which a mask counts as empty.

    Returns:
        ``(prototypes, valid)``: ``(B, K, C)`` prototypes, zero for empty masks, and ``(B, K)``
        bool, False for empty masks (their prototype is undefined: the losses skip them).
    """
    if features.shape[0] != masks.shape[0]:
        raise ValueError(f"features have batch {features.shape[0]}, masks {masks.shape[0]}")
    b, c = features.shape[:2]
    weights = level_masks(masks, features.shape[2:]).to(features.dtype).flatten(2)  # (B, K, N)
    total = weights.sum(dim=-1)
    valid = total > eps
    sums = torch.bmm(weights, features.reshape(b, c, -1).transpose(1, 2))  # (B, K, C)
    protos = sums / torch.where(valid, total, torch.ones_like(total))[..., None]
    return protos * valid[..., None].to(protos.dtype), valid


def _similarities(p_fixed: Tensor, p_warped: Tensor) -> Tensor:
    """``(B, K, K)`` cosine similarities ``cos(p_fixed[b, k], p_warped[b, j])``."""
    return torch.bmm(F.normalize(p_fixed, dim=-1, eps=1e-8), F.normalize(p_warped, dim=-1, eps=1e-8).transpose(1, 2))


def prototype_contrastive(p_fixed: Tensor, p_warped: Tensor, valid: Tensor, tau: float = 0.1) -> Tensor:
    """InfoNCE over ROIs: fixed ROI ``k``'s positive is warped-moving ROI ``k``.

    With ``s_kj = cos(p^f_k, p^w_j) / τ`` (cosine of the fixed prototype of ROI ``k`` and the
    warped-moving prototype of ROI ``j``) and ``V_b`` the valid ROIs of pair ``b``::

        ℓ_bk = −log( exp(s_kk) / Σ_{j ∈ V_b} exp(s_kj) )       for k ∈ V_b
        L    = mean over all (b, k) with k ∈ V_b of ℓ_bk

    so the negatives of anchor ``k`` are the warped-moving prototypes of every *other* valid ROI
    of the same image pair. Identical positives (``s_kk = 1/τ``) and orthogonal negatives
    (``s_kj = 0``) give ``ℓ = log(1 + (|V_b| − 1) e^{−1/τ})``; a single valid ROI gives 0.

    Args:
        p_fixed: ``(B, K, C)`` prototypes of the fixed image.
        p_warped: ``(B, K, C)`` prototypes of the warped moving image, channel ``k`` matched to
            fixed channel ``k``.
        valid: ``(B, K)`` bool, ROIs present in both (anchors and negatives).
        tau: Temperature τ > 0.

    Returns:
        Scalar in nats; 0 (keeping the graph) when no ROI is valid.
    """
    logits = _similarities(p_fixed, p_warped) / tau
    # Invalid ROIs leave the denominator: their exp underflows to exactly 0. A finite fill (not
    # -inf) keeps a pair with no valid ROI from producing inf - inf = NaN in the backward pass.
    logits = logits.masked_fill(~valid[:, None, :], torch.finfo(logits.dtype).min / 4)
    diag = torch.diagonal(logits, dim1=1, dim2=2)
    log_den = torch.logsumexp(logits, dim=-1)
    losses = (log_den - diag)[valid]
    return losses.mean() if losses.numel() else p_fixed.sum() * 0 + p_warped.sum() * 0


def prototype_alignment(p_fixed: Tensor, p_warped: Tensor, valid: Tensor) -> Tensor:
    """Mean ``1 − cos(p^f_k, p^w_k)`` over valid matched ROI pairs.

    Args:
        p_fixed, p_warped: ``(B, K, C)`` prototypes, channel ``k`` matched.
        valid: ``(B, K)`` bool.

    Returns:
        Scalar in ``[0, 2]``: 0 for parallel prototypes, 2 for opposite ones; 0 when none valid.
    """
    cos = F.cosine_similarity(p_fixed, p_warped, dim=-1, eps=1e-8)
    d = (1 - cos)[valid]
    return d.mean() if d.numel() else p_fixed.sum() * 0 + p_warped.sum() * 0


def multilevel_prototype_losses(
    fixed_features: Sequence[Tensor],
    warped_features: Sequence[Tensor],
    fixed_masks: Tensor,
    warped_masks: Tensor,
    tau: float = 0.1,
) -> tuple[Tensor, Tensor]:
    """Contrastive and alignment losses summed over feature levels.

    At each level the masks are resampled to the level's grid (:func:`level_masks`); a ROI is
    valid at a level when both its fixed and its warped-moving mask are non-empty there.

    Args:
        fixed_features: Per level, ``(B, C_l, *shape_l)`` features of the fixed image.
        warped_features: Per level, ``(B, C_l, *shape_l)`` features of the moving image warped
            onto the fixed grid (same shapes as ``fixed_features``).
        fixed_masks: ``(B, K, *shape)`` fixed masks in ``[0, 1]``.
        warped_masks: ``(B, K, *shape)`` moving masks warped onto the fixed grid.
        tau: InfoNCE temperature.

    Returns:
        ``(contrastive, alignment)`` scalars, each the sum over levels.
    """
    if len(fixed_features) != len(warped_features):
        raise ValueError(f"{len(fixed_features)} fixed feature levels but {len(warped_features)} warped ones")
    contrastive = fixed_masks.new_zeros(())
    alignment = fixed_masks.new_zeros(())
    for ff, fw in zip(fixed_features, warped_features):
        p_f, v_f = prototypes(ff, fixed_masks)
        p_w, v_w = prototypes(fw, warped_masks)
        valid = v_f & v_w
        contrastive = contrastive + prototype_contrastive(p_f, p_w, valid, tau)
        alignment = alignment + prototype_alignment(p_f, p_w, valid)
    return contrastive, alignment


class PrototypeContrastive(nn.Module):
    """``weight · Σ_levels InfoNCE``; the record's ``contrastive`` term is the unweighted sum."""

    def __init__(self, tau: float = 0.1, weight: float = 1.0) -> None:
        super().__init__()
        self.tau, self.weight = tau, weight

    def forward(self, fixed_features, warped_features, fixed_masks: Tensor, warped_masks: Tensor) -> LossRecord:
        value, _ = multilevel_prototype_losses(fixed_features, warped_features, fixed_masks, warped_masks, self.tau)
        return LossRecord(self.weight * value, {"contrastive": value})


class PrototypeAlignment(nn.Module):
    """``weight · Σ_levels mean(1 − cos)``; the record's ``alignment`` term is the unweighted sum."""

    def __init__(self, weight: float = 1.0) -> None:
        super().__init__()
        self.weight = weight

    def forward(self, fixed_features, warped_features, fixed_masks: Tensor, warped_masks: Tensor) -> LossRecord:
        _, value = multilevel_prototype_losses(fixed_features, warped_features, fixed_masks, warped_masks)
        return LossRecord(self.weight * value, {"alignment": value})
