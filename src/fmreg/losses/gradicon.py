"""GradICON's loss (Tian et al., CVPR 2023): bidirectional similarity + gradient inverse consistency.

    L = Sim(A ∘ Φ_AB, B) + Sim(B ∘ Φ_BA, A) + λ · Σ_d mean ‖(E(x) − E(x + δ e_d)) / δ‖²,
    E(x) = x − Φ_AB(Φ_BA(x)),

with ``x`` a randomly perturbed identity grid and ``δ = 1e-3``. Distances are measured as
uniGradICON does, in ``[0, 1]`` per array axis (half of fmreg's ``NORMALIZED`` units), so that
``λ = 1.5`` means what it means there.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from fmreg.core.sampling import identity_points, sample_normalized
from fmreg.losses.base import LossRecord
from fmreg.transforms.base import Transform

#: Finite-difference step of the inverse-consistency Jacobian, in [0, 1] image units.
DELTA = 1e-3


def perturbed_identity(batch: int, shape: tuple[int, ...], generator: torch.Generator | None = None) -> Tensor:
    """uniGradICON's sample points: the identity plus Gaussian noise of one voxel of the last axis.

    Returns:
        ``(batch, *shape, ndim)`` normalized points (noise σ = ``2 / shape[-1]`` normalized units).
    """
    ident = identity_points(shape).expand(batch, *shape, len(shape))
    noise = torch.randn(ident.shape, generator=generator)
    return ident + noise * (2.0 / shape[-1])


def inverse_consistency(phi_ab: Transform, phi_ba: Transform, points: Tensor, delta: float = DELTA) -> Tensor:
    """``Σ_d mean ‖∂E/∂x_d‖²`` of ``E(x) = x − Φ_AB(Φ_BA(x))`` by forward differences, [0, 1] units."""
    def error(p: Tensor) -> Tensor:
        return p - phi_ab.map_normalized(phi_ba.map_normalized(p))

    e0 = error(points)
    total = points.new_zeros(())
    for d in range(points.shape[-1]):
        step = torch.zeros(points.shape[-1], dtype=points.dtype)
        step[d] = 2.0 * delta  # δ in [0, 1] units is 2δ normalized
        # Normalized differences are twice the [0, 1] ones.
        grad = (e0 - error(points + step)) / (2.0 * delta)
        total = total + (grad * grad).mean()
    return total


def gradicon_loss(
    network: Callable[[Tensor, Tensor], Transform],
    moving: Tensor,
    fixed: Tensor,
    similarity: Callable[[Tensor, Tensor], LossRecord],
    lmbda: float = 1.5,
    points: Tensor | None = None,
) -> LossRecord:
    """The GradICON objective of one batch.

    Args:
        network: ``(moving, fixed) -> Φ`` with ``moving ∘ Φ ≈ fixed``.
        moving, fixed: ``(B, C, *shape)`` images on one grid ("A" and "B").
        similarity: ``(warped, target) -> LossRecord`` whose total is a dissimilarity
            (e.g. :class:`~fmreg.losses.image.GaussianLNCC`).
        lmbda: Weight λ of the inverse-consistency term.
        points: The perturbed identity (:func:`perturbed_identity`); drawn here when None. Pass
            it to evaluate two passes on the same points (sharpness-aware training).

    Returns:
        Record with ``similarity`` (both directions), ``inverse_consistency`` and the total.
    """
    shape = tuple(fixed.shape[2:])
    phi_ab, phi_ba = network(moving, fixed), network(fixed, moving)
    warped_ab = sample_normalized(moving, phi_ab.normalized_points(shape), padding="border")
    warped_ba = sample_normalized(fixed, phi_ba.normalized_points(shape), padding="border")
    sim = similarity(warped_ab, fixed).total + similarity(warped_ba, moving).total
    if points is None:
        points = perturbed_identity(fixed.shape[0], shape)
    icon = inverse_consistency(phi_ab, phi_ba, points)
    return LossRecord(sim + lmbda * icon, {"similarity": sim, "inverse_consistency": icon})
