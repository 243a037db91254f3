"""Overlap terms between soft masks: soft Dice and SAMReg's ROI-pair loss (paper 002, Eq. 10)."""

from __future__ import annotations

from torch import Tensor, nn

from fmreg.losses.base import LossRecord


def soft_dice(a: Tensor, b: Tensor) -> Tensor:
    """Soft Dice of ``(K, *shape)`` masks, pair by pair.

    Returns:
        ``(K,)`` values in ``[0, 1]`` (0 for two empty masks).
    """
    dims = tuple(range(1, a.dim()))
    return 2 * (a * b).sum(dim=dims) / (a.sum(dim=dims) + b.sum(dim=dims)).clamp_min(1e-6)


def roi_pair_loss(warped: Tensor, fixed: Tensor, weights: Tensor, mse_weight: float, dice_weight: float) -> LossRecord:
    """``Σ_k w_k [w_mse · MSE_k / area_k + w_dice · (1 − Dice_k)]`` over matched ROI pairs.

    A raw MSE over the whole image is about the ROI's area fraction, tiny for small ROIs;
    dividing by that fraction makes it the fraction of the ROI that is misaligned, comparable
    to Dice whatever the ROI's size.

    Args:
        warped: ``(K, *shape)`` moving masks warped onto the fixed grid, in ``[0, 1]``.
        fixed: ``(K, *shape)`` fixed masks.
        weights: ``(K,)`` pair weights summing to one.
        mse_weight, dice_weight: Weights of the two terms (the paper: equal).

    Returns:
        Record with terms ``roi`` (the weighted total) and ``dice`` (weighted mean Dice).
    """
    dims = tuple(range(1, fixed.dim()))
    err = ((warped - fixed) ** 2).mean(dim=dims)
    area = fixed.mean(dim=dims).clamp_min(1e-4)
    dice = soft_dice(warped, fixed)
    total = (weights * (mse_weight * err * (1.0 / area) + dice_weight * (1 - dice))).sum()
    return LossRecord(total, {"roi": total, "dice": (weights * dice).sum()})


class SoftDice(nn.Module):
    """``1 − mean soft Dice`` of ``(K, *shape)`` masks; the record's ``dice`` term is the mean Dice."""

    def forward(self, warped: Tensor, fixed: Tensor) -> LossRecord:
        dice = soft_dice(warped, fixed).mean()
        return LossRecord(1 - dice, {"dice": dice})
