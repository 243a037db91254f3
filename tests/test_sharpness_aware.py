"""SharpnessAware (SAM / ASAM): hand-computed steps and the bias toward flat minima."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch.testing import assert_close

from fmreg.optimize.sharpness_aware import SharpnessAware, frozen_batchnorm_stats


def _quadratic(w: torch.Tensor) -> torch.Tensor:
    return 0.5 * (3 * w[0] ** 2 + w[1] ** 2)  # gradient (3 w0, w1)


def _one_step(adaptive: bool, rho: float) -> torch.Tensor:
    w = torch.tensor([1.0, 2.0], dtype=torch.float64, requires_grad=True)
    opt = SharpnessAware(torch.optim.SGD([w], lr=0.1), rho=rho, adaptive=adaptive)

    def closure():
        opt.zero_grad()
        loss = _quadratic(w)
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert float(loss.detach()) == pytest.approx(0.5 * (3 + 4))  # the loss at w, not at w + e
    return w.detach()


def test_one_sam_step_on_a_quadratic_by_hand():
    # g = (3, 2), |g| = sqrt(13); e = rho g / |g|; the step uses g(w + e) = (3 (1 + e0), 2 + e1).
    e0, e1 = 0.1 * 3 / math.sqrt(13), 0.1 * 2 / math.sqrt(13)
    expected = torch.tensor([1 - 0.1 * 3 * (1 + e0), 2 - 0.1 * (2 + e1)], dtype=torch.float64)
    assert_close(_one_step(adaptive=False, rho=0.1), expected)


def test_one_asam_step_on_a_quadratic_by_hand():
    # |w| g = (3, 4), norm 5; e = rho w^2 g / 5 = 0.1 (3, 8) / 5 = (0.06, 0.16).
    expected = torch.tensor([1 - 0.1 * 3 * 1.06, 2 - 0.1 * 2.16], dtype=torch.float64)
    assert_close(_one_step(adaptive=True, rho=0.1), expected)


@pytest.mark.parametrize("base", ["sgd", "adam"])
def test_sam_ends_in_the_flattest_minimum_where_the_base_optimizer_does_not(base):
    # f(a, b) = (ab - 1)^2: every point of the hyperbola ab = 1 is a minimum, with Hessian
    # sharpness 2 (a^2 + b^2): flattest (4) at a = b = 1. From an unbalanced start plain
    # descent stops at the nearest, sharp minimum; SAM drifts along the valley to the flat one.
    def run(sharpness_aware: bool) -> tuple[float, float, float]:
        w = torch.tensor([2.5, 0.1], dtype=torch.float64, requires_grad=True)
        inner = torch.optim.SGD([w], lr=0.02) if base == "sgd" else torch.optim.Adam([w], lr=0.01)
        opt = SharpnessAware(inner, rho=0.2) if sharpness_aware else inner

        def closure():
            opt.zero_grad()
            loss = (w[0] * w[1] - 1) ** 2
            loss.backward()
            return loss

        for _ in range(2000):
            if sharpness_aware:
                opt.step(closure)
            else:
                closure()
                opt.step()
        a, b = w.tolist()
        return (a * b - 1) ** 2, 2 * (a * a + b * b), abs(a - b)

    loss_plain, sharp_plain, _ = run(False)
    loss_sam, sharp_sam, gap_sam = run(True)
    assert loss_plain < 1e-6 and loss_sam < 1e-3  # both reach the valley
    assert sharp_plain > 12.0  # the base optimizer stays in a sharp minimum
    assert sharp_sam < 4.1 and gap_sam < 0.05  # SAM ends at the flattest point, a = b = 1


def test_batchnorm_statistics_do_not_move_in_the_perturbed_pass():
    bn = torch.nn.BatchNorm1d(3)
    x = torch.randn(8, 3, generator=torch.Generator().manual_seed(0)) * 5 + 2
    before = (bn.running_mean.clone(), bn.running_var.clone(), bn.num_batches_tracked.clone())
    with frozen_batchnorm_stats(bn):
        bn(x)
    assert torch.equal(bn.running_mean, before[0]) and torch.equal(bn.running_var, before[1])
    assert torch.equal(bn.num_batches_tracked, before[2]) and bn.momentum == 0.1
    bn(x)  # outside the context the statistics move again
    assert not torch.equal(bn.running_mean, before[0])


def test_state_dict_round_trip_continues_identically():
    def make():
        w = torch.tensor([1.0, -2.0, 0.5], requires_grad=True)
        return w, SharpnessAware(torch.optim.Adam([w], lr=0.05), rho=0.2, adaptive=True)

    def steps(w, opt, n):
        for _ in range(n):
            def closure():
                opt.zero_grad()
                loss = (w**4).sum() + w.prod()
                loss.backward()
                return loss
            opt.step(closure)

    w1, o1 = make()
    steps(w1, o1, 3)
    w2, o2 = make()
    with torch.no_grad():
        w2.copy_(w1)
    # A deep copy, as a checkpoint written to disk is: torch shares state tensors otherwise.
    o2.load_state_dict(copy.deepcopy(o1.state_dict()))
    assert o2.rho == 0.2 and o2.adaptive
    steps(w1, o1, 4)
    steps(w2, o2, 4)
    assert torch.equal(w1, w2)


def test_negative_rho_is_refused():
    with pytest.raises(ValueError, match="rho"):
        SharpnessAware(torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1), rho=-1)
