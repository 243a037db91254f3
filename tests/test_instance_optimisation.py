"""Instance optimisation: Adam over the weights of a copy of a network, on one pair's loss."""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

from fmreg.losses.base import LossRecord
from fmreg.optimize.instance import instance_optimise


def test_one_step_moves_every_weight_by_lr_against_its_gradient_and_leaves_the_original():
    net = torch.nn.Linear(3, 1)
    with torch.no_grad():
        net.weight.copy_(torch.tensor([[1.0, -2.0, 0.5]]))
        net.bias.fill_(0.25)
    target = torch.tensor([[0.0, 3.0, 0.5]])

    def objective(n):
        loss = (n.weight - target).square().sum() + n.bias.square()
        return LossRecord(loss, {"loss": loss})

    tuned = instance_optimise(net.train(), objective, iterations=1, lr=0.1)
    # Adam's first step is lr · g / (|g| + eps) per weight: lr along the gradient's sign.
    assert_close(tuned.weight, torch.tensor([[0.9, -1.9, 0.5]]), atol=1e-6, rtol=0)
    assert_close(tuned.bias, torch.tensor([0.15]), atol=1e-6, rtol=0)
    assert not tuned.training
    assert_close(net.weight, torch.tensor([[1.0, -2.0, 0.5]]))  # the caller's network is untouched
    many = instance_optimise(net, objective, iterations=200, lr=0.05)
    assert float(objective(many).total.detach()) < 0.01  # from 26.06


@pytest.mark.usefixtures("one_torch_thread")
def test_mask_guided_instance_optimisation_changes_the_field_and_not_the_file(tmp_path):
    from fmreg import phantoms
    from fmreg.cli import main
    from fmreg.methods.mask_guided import MaskGuidedMethod

    run = tmp_path / "run"
    train = ["train", "-o", str(run), "--model", "mask-guided", "--synthetic", "2d", "--size", "32", "32",
             "--width", "0.5", "--batch", "2", "--mask-channels", "2", "--steps", "2", "-q"]
    assert main(train) == 0
    before = (run / "checkpoint.pt").read_bytes()
    pair = phantoms.make_pair(2, seed=2)
    weights = str(run / "checkpoint.pt")
    plain = MaskGuidedMethod(weights=weights).register(pair.fixed, pair.moving)
    tuned = MaskGuidedMethod(weights=weights, io_iterations=3, io_lr=1e-3).register(pair.fixed, pair.moving)
    assert float((tuned.field.data - plain.field.data).abs().max()) > 1e-4
    assert tuned.parameters["io_iterations"] == 3 and tuned.stage_seconds["instance_optimisation"] > 0
    assert (run / "checkpoint.pt").read_bytes() == before
    again = MaskGuidedMethod(weights=weights).register(pair.fixed, pair.moving)
    assert torch.equal(again.field.data, plain.field.data)  # nothing carried over between pairs


@pytest.mark.parametrize("iterations, lr", [(-1, 1e-4), (5, 0.0), (5, float("nan"))])
def test_both_networks_refuse_instance_settings_they_cannot_use(iterations, lr):
    from fmreg.errors import FmregError
    from fmreg.methods.gradicon import GradICONMethod
    from fmreg.methods.mask_guided import MaskGuidedMethod

    for method in (GradICONMethod, MaskGuidedMethod):
        with pytest.raises(FmregError, match=r"^io_iterations must be >= 0 and io_lr > 0$"):
            method(io_iterations=iterations, io_lr=lr)
