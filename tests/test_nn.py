"""The uniGradICON network: released-weight compatibility, frames, identity at initialisation."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.testing import assert_close

from fmreg.core.sampling import identity_points
from fmreg.nn.gradicon import GradICON, TwoStep, VectorFieldStep, icon_to_normalized
from fmreg.nn.unet import UNet

FIXTURE = Path(__file__).parent / "fixtures" / "unigradicon_regis_net_3d.json"
SMALL = dict(down=(4, 8, 8, 16, 16), up=(4, 8, 8, 16, 16))

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_released_unigradicon_state_dict_loads_strictly():
    # Keys, shapes and dtypes of icon_registration's uniGradICON regis_net (generated once
    # from its network code): a released Step_2_final.trch has exactly these.
    spec = json.loads(FIXTURE.read_text())
    state = {k: torch.zeros(v["shape"], dtype=getattr(torch, v["dtype"])) for k, v in spec.items()}
    model = GradICON(3)
    model.regis_net.load_state_dict(state, strict=True)
    assert sum(p.numel() for p in model.parameters()) == 70_680_916  # uniGradICON: 70.7 M


def test_an_untrained_network_is_the_identity_in_2d_and_3d():
    # 3D average pooling needs two voxels at every U-Net level of the 1/4-resolution step.
    for dim, shape, widths in ((2, (64, 48), SMALL), (3, (32, 32, 32), dict(down=(4, 8, 8), up=(4, 8, 8)))):
        model = GradICON(dim, **widths).eval()
        a, b = torch.rand(2, 1, *shape), torch.rand(2, 1, *shape)
        pts = model(a, b).normalized_points(shape)
        assert pts.shape == (2, *shape, dim)
        assert_close(pts, identity_points(shape).expand_as(pts))


class _Constant(nn.Module):
    """A 'U-Net' that returns a constant displacement in icon units (array order, [0, 1])."""

    def __init__(self, value):
        super().__init__()
        self.value = torch.tensor(value)

    def forward(self, moving, fixed):
        return self.value.reshape(1, -1, *[1] * (moving.dim() - 2)).expand(moving.shape[0], -1, *moving.shape[2:])


def test_icon_units_become_normalized_x_first():
    # 0.1 of the image along array axis 0 (rows, y) is 0.2 normalized units on component y.
    u = icon_to_normalized(torch.tensor([0.1, -0.05]).reshape(1, 2, 1, 1))
    assert_close(u.flatten(), torch.tensor([-0.1, 0.2]))
    step = VectorFieldStep(_Constant([0.1, -0.05]))
    shape = (9, 11)
    pts = step(torch.zeros(1, 1, *shape), torch.zeros(1, 1, *shape)).normalized_points(shape)
    assert_close(pts - identity_points(shape), torch.tensor([-0.1, 0.2]).expand(1, *shape, 2))


def test_two_steps_compose_their_translations():
    shape = (16, 12)
    net = TwoStep(VectorFieldStep(_Constant([0.1, 0.0])), VectorFieldStep(_Constant([0.0, 0.05])))
    pts = net(torch.rand(1, 1, *shape), torch.rand(1, 1, *shape)).normalized_points(shape)
    # Interior points move by the sum; border padding clamps displacement lookups, not points.
    assert_close((pts - identity_points(shape))[0, 4, 4], torch.tensor([0.1, 0.2]))


def test_gradients_reach_every_unet_of_the_cascade():
    model = GradICON(2, **SMALL)
    for m in model.modules():
        if isinstance(m, UNet):
            nn.init.normal_(m.lastConv.weight, std=0.01)  # zero-initialised otherwise: no gradient below
    shape = (64, 64)
    a, b = torch.rand(1, 1, *shape), torch.rand(1, 1, *shape)
    model(a, b).normalized_points(shape).square().mean().backward()
    unets = [m for m in model.modules() if isinstance(m, UNet)]
    assert len(unets) == 4
    assert all(float(u.downConvs[0].weight.grad.abs().sum()) > 0 for u in unets)


def test_unet_rejects_a_bad_configuration():
    with pytest.raises(ValueError, match="dimension"):
        UNet(4)
    with pytest.raises(ValueError, match="equal-length"):
        UNet(2, down=(4, 8), up=(4,))
