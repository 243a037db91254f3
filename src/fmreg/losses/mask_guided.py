"""The training objective of mask-guided registration (paper 001, Xu et al., IPMI 2025).

    L = w_ncc (1 − LNCC) + w_diffusion · diffusion + w_dice (1 − Dice) + w_contour · Chamfer²
        + w_contrastive · Σ_levels InfoNCE + w_alignment · Σ_levels (1 − cos)

Default weights are the published code's (NCC 4, diffusion 1, Dice 1, contrastive 0.01) except
the contour term's (0.001 instead of 0.1, measured: see :data:`DEFAULT_WEIGHTS`); the published
code has no alignment term, and 0.01 is chosen here so the two prototype
terms weigh alike (both are O(1) per level). The published code's similarity is VoxelMorph's
squared windowed NCC; here it is :func:`~fmreg.losses.image.gaussian_lncc` squared, with a
Gaussian window of σ = ``ncc_sigma`` voxels (2.5 ≈ the standard deviation of a 9-voxel box).
"""

from __future__ import annotations

from typing import Mapping, Sequence

from torch import Tensor, nn

from fmreg.core.sampling import identity_points, sample_normalized
from fmreg.losses.base import LossRecord
from fmreg.losses.contour import contour_chamfer
from fmreg.losses.image import gaussian_lncc
from fmreg.losses.overlap import soft_dice
from fmreg.losses.prototype import multilevel_prototype_losses
from fmreg.losses.regularization import diffusion

#: The published code's weights, except the contour term's (alignment: this implementation's choice,
#: see the module docstring). The published 0.1 weighs a voxel-unit Hausdorff term; on this
#: squared Chamfer distance in mm² it is ~3/4 of the loss at 128² and training does not learn
#: (700 synthetic steps: soft Dice 0.30 → 0.20); at 0.001 it does (0.50 → 0.78), see docs/benchmarks.md.
DEFAULT_WEIGHTS = {"ncc": 4.0, "diffusion": 1.0, "dice": 1.0, "contour": 0.001, "contrastive": 0.01, "alignment": 0.01}


def normalized_to_mm(displacement: Tensor, spacing: Sequence[float]) -> Tensor:
    """A ``NORMALIZED`` displacement in mm along the array axes' directions.

    Args:
        displacement: ``(B, ndim, *shape)``, components ``x, y[, z]``, normalized units.
        spacing: mm per array axis.

    Returns:
        ``(B, ndim, *shape)`` in mm, components still ``x, y[, z]`` (component ``c`` runs along
        array axis ``ndim − 1 − c``; one normalized unit is ``(n − 1) / 2`` voxels).
    """
    shape = displacement.shape[2:]
    ndim = len(shape)
    scale = [(shape[ndim - 1 - c] - 1) / 2 * float(spacing[ndim - 1 - c]) for c in range(ndim)]
    return displacement * displacement.new_tensor(scale).reshape(1, ndim, *([1] * ndim))


def _mean_dice(warped_masks: Tensor, fixed_masks: Tensor, moving_masks: Tensor) -> Tensor:
    """Mean soft Dice over the ROI pairs present in both images (empty channels are no pair)."""
    b, k = fixed_masks.shape[:2]
    dice = soft_dice(warped_masks.flatten(0, 1), fixed_masks.flatten(0, 1)).reshape(b, k)
    present = (fixed_masks.flatten(2).sum(-1) > 0) & (moving_masks.flatten(2).sum(-1) > 0)
    return dice[present].mean() if present.any() else warped_masks.sum() * 0


def mask_guided_loss(
    network: nn.Module,
    moving: Tensor,
    fixed: Tensor,
    moving_masks: Tensor,
    fixed_masks: Tensor,
    weights: Mapping[str, float] | None = None,
    spacing: Sequence[float] | None = None,
    tau: float = 0.1,
    ncc_sigma: float = 2.5,
    mask_inputs: bool = True,
) -> LossRecord:
    """The objective of one batch.

    Args:
        network: A :class:`~fmreg.nn.mask_guided.MaskGuidedNet` (called with ``return_features=True``).
        moving, fixed: ``(B, 1, *shape)`` images on one working grid.
        moving_masks, fixed_masks: ``(B, K, *shape)`` matched masks in ``[0, 1]`` on that grid.
        weights: Overrides of :data:`DEFAULT_WEIGHTS` (keys ``ncc, diffusion, dice, contour,
            contrastive, alignment``).
        spacing: mm per array axis of the working grid (default 1 mm): units of the contour
            (mm²) and diffusion ((mm/mm)², dimensionless) terms.
        tau: InfoNCE temperature.
        ncc_sigma: LNCC Gaussian window σ, voxels.
        mask_inputs: False gives the network empty mask channels (the masks still enter the
            losses): the images-only baseline of the ablation.

    Returns:
        Record: ``total`` (weighted sum) and terms ``ncc`` (the LNCC similarity), ``dice`` (mean
        Dice), ``diffusion``, ``contour`` (mm²), ``contrastive``, ``alignment`` (unweighted
        losses) and ``total``.
    """
    unknown = set(weights or {}) - set(DEFAULT_WEIGHTS)
    if unknown:
        raise ValueError(f"unknown loss weights {sorted(unknown)}; known: {sorted(DEFAULT_WEIGHTS)}")
    w = {**DEFAULT_WEIGHTS, **(weights or {})}
    shape = tuple(fixed.shape[2:])
    spacing = tuple(float(s) for s in (spacing or (1.0,) * len(shape)))
    seen = (moving_masks, fixed_masks) if mask_inputs else (moving_masks * 0, fixed_masks * 0)
    out = network(moving, fixed, *seen, return_features=True)
    points = identity_points(shape, out.displacement.dtype).to(out.displacement.device) + out.displacement.movedim(1, -1)
    warped = sample_normalized(moving, points, padding="border")
    # Zeros outside: no ROI lies beyond the moving image's field of view.
    warped_masks = sample_normalized(moving_masks, points, padding="zeros")
    ncc = gaussian_lncc(warped, fixed, ncc_sigma, squared=True)
    u_mm = normalized_to_mm(out.displacement, spacing)
    reg = diffusion(u_mm.flatten(0, 1), spacing)
    dice = _mean_dice(warped_masks, fixed_masks, moving_masks)
    contour = contour_chamfer(warped_masks, fixed_masks, spacing, moving_masks, points)
    contrastive, alignment = multilevel_prototype_losses(out.fixed_features, out.warped_features, fixed_masks,
                                                         warped_masks, tau)
    total = (w["ncc"] * (1 - ncc) + w["diffusion"] * reg + w["dice"] * (1 - dice) + w["contour"] * contour
             + w["contrastive"] * contrastive + w["alignment"] * alignment)
    terms = {"ncc": ncc, "diffusion": reg, "dice": dice, "contour": contour, "contrastive": contrastive,
             "alignment": alignment, "total": total}
    return LossRecord(total, terms)


class MaskGuidedLoss(nn.Module):
    """:func:`mask_guided_loss` with its settings held: ``loss(network, moving, fixed, mm, fm)``."""

    def __init__(self, weights: Mapping[str, float] | None = None, spacing: Sequence[float] | None = None,
                 tau: float = 0.1, ncc_sigma: float = 2.5, mask_inputs: bool = True) -> None:
        super().__init__()
        self.weights = dict(weights or {})
        self.spacing = None if spacing is None else tuple(spacing)
        self.tau, self.ncc_sigma, self.mask_inputs = tau, ncc_sigma, mask_inputs

    def forward(self, network: nn.Module, moving: Tensor, fixed: Tensor, moving_masks: Tensor,
                fixed_masks: Tensor) -> LossRecord:
        return mask_guided_loss(network, moving, fixed, moving_masks, fixed_masks, self.weights, self.spacing,
                                self.tau, self.ncc_sigma, self.mask_inputs)


__all__ = ["DEFAULT_WEIGHTS", "MaskGuidedLoss", "mask_guided_loss", "normalized_to_mm"]
