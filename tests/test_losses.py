"""The losses package: hand-computed values and the loss record."""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

from fmreg.losses import (LNCC, MSE, Diffusion, LossRecord, SoftDice, correlation, diffusion, lncc, mse,
                          roi_pair_loss, soft_dice)


def test_soft_dice_by_hand():
    a = torch.tensor([[1.0, 1.0, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0]])
    b = torch.tensor([[1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    # pair 0: 2·1 / (2 + 1); pair 1: 0 / (1 + 0)
    assert_close(soft_dice(a, b), torch.tensor([2 / 3, 0.0]))
    record = SoftDice()(a, b)
    assert_close(record.total, torch.tensor(1 - 1 / 3))
    assert_close(record.terms["dice"], torch.tensor(1 / 3))


def test_roi_pair_loss_by_hand():
    fixed = torch.tensor([[1.0, 1.0, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0]])
    warped = torch.tensor([[1.0, 0.0, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0]])
    weights = torch.tensor([0.25, 0.75])
    # pair 0: MSE 1/4, area 1/2 -> 0.5; Dice 2/3. pair 1: MSE 0, Dice 1.
    expected = 0.25 * (2.0 * 0.5 + 3.0 * (1 - 2 / 3)) + 0.75 * (0.0 + 0.0)
    record = roi_pair_loss(warped, fixed, weights, mse_weight=2.0, dice_weight=3.0)
    assert_close(record.total, torch.tensor(expected))
    assert_close(record.terms["roi"], torch.tensor(expected))
    assert_close(record.terms["dice"], torch.tensor(0.25 * 2 / 3 + 0.75))


def test_image_terms_and_records():
    a = torch.tensor([0.0, 1.0, 0.5, 0.5])
    b = torch.tensor([1.0, 1.0, 0.5, 0.0])
    assert_close(mse(a, b), torch.tensor(1.25 / 4))
    rec = MSE(scale=10.0)(a, b)
    assert_close(rec.total, torch.tensor(12.5 / 4)) and rec.terms.keys() == {"mse"}
    img = torch.rand(12, 14, generator=torch.Generator().manual_seed(0)) * 10
    rec = LNCC((3, 3))(img, 2 * img + 1)
    assert float(rec.terms["lncc"]) == pytest.approx(1.0, abs=1e-3)
    assert_close(rec.total, 1 - rec.terms["lncc"])


def test_diffusion_record_is_weighted_and_records_add_up():
    v = torch.stack([torch.arange(4.0).reshape(1, 4).expand(3, 4)] * 2)  # d/dx = 1 per voxel
    rec = Diffusion((1.0, 2.0), weight=3.0)(v)
    assert_close(rec.total, torch.tensor(3.0 * 0.25))  # (1 / 2 mm)² along x, 0 along y
    both = rec + LossRecord(torch.tensor(1.0), {"x": torch.tensor(5.0)})
    assert_close(both.total, torch.tensor(1.75))
    assert both.floats() == {"reg": 0.75, "x": 5.0}


def test_diffusion_of_a_linear_field_on_an_anisotropic_grid():
    # v_c(z, y, x) = A[c, 0] z + A[c, 1] y + A[c, 2] x in index units, spacing (array order)
    # 5, 2, 0.5 mm: every forward difference along axis k is A[c, k] / sp_k, so the penalty is
    # sum_k mean_c (A[c, k] / sp_k)^2.
    coeff = torch.tensor([[1.0, 0.5, 0.1], [2.0, -1.0, 0.2], [3.0, 2.0, -0.3]], dtype=torch.float64)
    spacing = (5.0, 2.0, 0.5)
    z, y, x = torch.meshgrid(*(torch.arange(n, dtype=torch.float64) for n in (4, 5, 6)), indexing="ij")
    v = torch.stack([coeff[c, 0] * z + coeff[c, 1] * y + coeff[c, 2] * x for c in range(3)])
    by_hand = (
        ((1 / 5) ** 2 + (2 / 5) ** 2 + (3 / 5) ** 2) / 3
        + ((0.5 / 2) ** 2 + (1 / 2) ** 2 + (2 / 2) ** 2) / 3
        + ((0.1 / 0.5) ** 2 + (0.2 / 0.5) ** 2 + (0.3 / 0.5) ** 2) / 3
    )
    assert by_hand == pytest.approx(0.810833333, abs=1e-8)
    assert_close(diffusion(v, spacing), torch.tensor(by_hand, dtype=torch.float64))
    # A constant field costs nothing; an axis of length 1 is skipped.
    assert float(diffusion(torch.full((3, 4, 5, 6), 7.0), spacing)) == 0.0
    flat = v[:, :1]
    assert_close(diffusion(flat, spacing), torch.tensor(by_hand - ((1 / 5) ** 2 + (2 / 5) ** 2 + (3 / 5) ** 2) / 3, dtype=torch.float64))


@pytest.mark.parametrize("shape,window", [((40, 50), (5, 7)), ((6, 20, 24), (3, 5, 5))])
def test_lncc_is_one_for_the_same_image_and_any_affine_intensity_change(shape, window):
    gen = torch.Generator().manual_seed(0)
    a = 10.0 * torch.rand(shape, generator=gen)  # large local variance: eps is negligible
    assert float(lncc(a, a, window)) == pytest.approx(1.0, abs=1e-3)
    assert float(lncc(a, 3.0 * a + 2.0, window)) == pytest.approx(1.0, abs=1e-3)
    assert float(lncc(a, -2.0 * a + 50.0, window)) == pytest.approx(1.0, abs=1e-3)  # squared form
    b = 10.0 * torch.rand(shape, generator=gen)
    assert float(lncc(a, b, window)) < 0.2  # independent noise


def test_correlation_is_one_for_an_intensity_gain_minus_one_for_inversion_and_zero_for_a_constant():

    a = torch.rand(17, 9, generator=torch.Generator().manual_seed(1))
    assert correlation(a, 3 * a + 2) == pytest.approx(1.0, abs=1e-6)
    assert correlation(a, 1 - a) == pytest.approx(-1.0, abs=1e-6)
    assert correlation(a, torch.full_like(a, 0.5)) == 0.0


# ---------------------------------------------------------------------------- GradICON
def _gradicon_parts():
    from fmreg.core.grid import Grid
    from fmreg.losses.gradicon import gradicon_loss, inverse_consistency, perturbed_identity
    from fmreg.transforms.affine import AffineTransform
    from fmreg.transforms.displacement import DisplacementTransform

    return Grid, gradicon_loss, inverse_consistency, perturbed_identity, AffineTransform, DisplacementTransform


def test_inverse_consistency_of_exact_inverses_is_zero_and_of_a_scaling_is_by_hand():
    Grid, _, inverse_consistency, perturbed_identity, AffineTransform, DisplacementTransform = _gradicon_parts()
    grid = Grid((12, 10))
    pts = perturbed_identity(2, grid.shape, torch.Generator().manual_seed(0))
    shift = torch.tensor([0.1, -0.3]).reshape(1, 2, 1, 1).expand(2, 2, *grid.shape)
    forward, backward = DisplacementTransform(shift, grid), DisplacementTransform(-shift, grid)
    assert float(inverse_consistency(forward, backward, pts)) < 1e-8
    # Φ_AB(x) = a x, Φ_BA = id: E(x) = (1 - a) x, so ∂E/∂x_d = (1 - a) e_d in any units and
    # the mean over the d components of its square is (1 - a)² / d; summed over d: (1 - a)².
    a = 0.8
    scaling = AffineTransform(a * torch.eye(2), torch.zeros(2), grid)
    identity = AffineTransform.identity(grid)
    assert_close(inverse_consistency(scaling, identity, pts), torch.tensor((1 - a) ** 2), atol=1e-5, rtol=1e-4)


def test_perturbed_identity_has_one_voxel_of_noise():
    _, _, _, perturbed_identity, _, _ = _gradicon_parts()
    from fmreg.core.sampling import identity_points

    pts = perturbed_identity(4, (20, 50), torch.Generator().manual_seed(0))
    noise = pts - identity_points((20, 50))
    assert float(noise.std()) == pytest.approx(2.0 / 50, rel=0.05)  # one voxel of the last axis


def test_gradicon_loss_of_the_identity_network_is_the_dissimilarity_both_ways():
    Grid, gradicon_loss, _, _, AffineTransform, _ = _gradicon_parts()
    from fmreg.losses import GaussianLNCC

    g = torch.Generator().manual_seed(0)
    fixed = torch.rand(2, 1, 24, 20, generator=g)
    moving = torch.rand(2, 1, 24, 20, generator=g)
    network = lambda m, f: AffineTransform.identity(Grid(tuple(f.shape[2:])))  # noqa: E731
    sim = GaussianLNCC(sigma=2.0)
    record = gradicon_loss(network, moving, fixed, sim)
    expected = sim(moving, fixed).total + sim(fixed, moving).total
    assert_close(record.terms["similarity"], expected)
    assert float(record.terms["inverse_consistency"]) == 0.0
    assert_close(record.total, expected)


def test_gaussian_lncc_is_one_under_an_increasing_affine_intensity_change():
    from fmreg.losses import gaussian_lncc
    from fmreg.losses.image import gaussian_blur

    img = 10 * torch.rand(1, 1, 30, 30, generator=torch.Generator().manual_seed(0))
    assert float(gaussian_lncc(img, 3 * img + 2, sigma=2.0)) == pytest.approx(1.0, abs=1e-3)
    assert float(gaussian_lncc(img, -img, sigma=2.0)) == pytest.approx(-1.0, abs=1e-3)
    assert float(gaussian_lncc(img, -img, sigma=2.0, squared=True)) == pytest.approx(1.0, abs=1e-3)
    ones = torch.ones(1, 1, 30, 30)
    assert_close(gaussian_blur(ones, 2.0)[0, 0, 10:20, 10:20], torch.ones(10, 10))  # a normalised kernel


@pytest.mark.parametrize("shape", [(1, 1, 24, 20), (1, 1, 10, 12, 14)])
def test_mind_ssc_similarity_ignores_contrast_and_sees_a_shift(shape):
    from fmreg.core.descriptors import blur_replicate, mind_ssc
    from fmreg.losses.image import MINDSSC

    g = torch.Generator().manual_seed(0)
    x = blur_replicate(torch.rand(shape, generator=g), 1.0)
    assert mind_ssc(x).shape[1] == (6 if len(shape) == 4 else 12)
    loss = MINDSSC()
    # Descriptors depend on intensity differences over their local variance: an affine
    # intensity change, even an inversion, leaves them as they are.
    assert_close(loss(x, 0.5 - 3.0 * x).total, torch.tensor(0.0), atol=1e-6, rtol=0)
    shifted = torch.roll(x, 2, dims=-1)
    assert float(loss(shifted, x).total) > 1e-3
    assert set(loss(x, x).terms) == {"mind_ssc"}


def test_weighted_mse_and_correlation_count_only_the_weighted_voxels():
    fixed = torch.tensor([0.0, 1.0, 2.0, 5.0])
    warped = torch.tensor([1.0, 1.0, 4.0, 0.0])
    weight = torch.tensor([1.0, 1.0, 2.0, 0.0])
    # (1·1 + 1·0 + 2·4) / (1 + 1 + 2)
    assert_close(mse(fixed, warped, weight), torch.tensor(9.0 / 4.0))
    assert_close(MSE(scale=10.0)(fixed, warped, weight).total, torch.tensor(22.5))
    # Where the weight is 1 the images are a gain apart; the unweighted voxel would break it.
    a, b = torch.tensor([1.0, 2.0, 3.0, 9.0]), torch.tensor([2.0, 4.0, 6.0, -9.0])
    assert correlation(a, b, torch.tensor([1.0, 1.0, 1.0, 0.0])) == pytest.approx(1.0)
    assert correlation(a, b) < 0.0
    assert correlation(a, b, torch.ones(4)) == pytest.approx(correlation(a, b))
