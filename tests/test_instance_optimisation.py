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
    mapped = MaskGuidedMethod(weights=weights, io_iterations=3, io_space="field").register(pair.fixed, pair.moving)
    assert float((mapped.field.data - plain.field.data).abs().max()) > 1e-4
    assert mapped.parameters["io_space"] == "field" and (run / "checkpoint.pt").read_bytes() == before


@pytest.mark.parametrize("iterations, lr", [(-1, 1e-4), (5, 0.0), (5, float("nan"))])
def test_both_networks_refuse_instance_settings_they_cannot_use(iterations, lr):
    from fmreg.errors import FmregError
    from fmreg.methods.gradicon import GradICONMethod
    from fmreg.methods.mask_guided import MaskGuidedMethod

    for method in (GradICONMethod, MaskGuidedMethod):
        with pytest.raises(FmregError, match=r"^io_iterations must be >= 0 and io_lr > 0$"):
            method(io_iterations=iterations, io_lr=lr)


def _blobs(shift_px: float = 0.0, n: int = 48) -> torch.Tensor:
    """``(1, 1, n, n)`` smooth image: two Gaussian blobs, moved ``shift_px`` along x."""
    yy, xx = torch.meshgrid(torch.arange(float(n)), torch.arange(float(n)), indexing="ij")
    xx = xx - shift_px
    img = torch.exp(-((xx - 18) ** 2 + (yy - 20) ** 2) / 40.0) + 0.7 * torch.exp(-((xx - 30) ** 2 + (yy - 28) ** 2) / 30.0)
    return img[None, None]


def _mse_objective(moving: torch.Tensor, fixed: torch.Tensor):
    from fmreg.core.sampling import sample_normalized

    def objective(points):
        value = ((sample_normalized(moving, points, padding="border") - fixed) ** 2).mean()
        return LossRecord(value, {"mse": value})

    return objective


def _identity_map(n: int = 48):
    from fmreg.core.grid import Grid
    from fmreg.transforms.displacement import DisplacementTransform

    return DisplacementTransform(torch.zeros(1, 2, n, n), Grid((n, n)))


def test_map_refinement_recovers_a_known_shift_from_the_identity():
    from fmreg.optimize.instance import refine_map

    fixed, moving = _blobs(), _blobs(2.0)  # moving(x) = fixed(x − 2 px): T(x) = x + 2 px along x
    refined = refine_map(_identity_map(), (48, 48), _mse_objective(moving, fixed), iterations=90, lr=3e-3)
    u = refined.normalized_points((48, 48))[0] - _identity_map().normalized_points((48, 48))[0]
    px = 2.0 / 47  # one voxel in NORMALIZED units
    # Where the blobs are (elsewhere the images say nothing about the shift).
    core = u[14:34, 14:34]
    assert_close(core[..., 0].mean() / px, torch.tensor(2.0), atol=0.1, rtol=0)
    assert float(core[..., 1].abs().max() / px) < 0.1


def test_map_refinement_of_a_right_map_stays_put_and_zero_steps_change_nothing():
    from fmreg.optimize.instance import refine_map

    fixed = _blobs()
    start = _identity_map()
    assert refine_map(start, (48, 48), _mse_objective(fixed, fixed), iterations=0, lr=3e-3) is start
    refined = refine_map(start, (48, 48), _mse_objective(fixed, fixed), iterations=30, lr=3e-3)
    drift = refined.normalized_points((48, 48)) - start.normalized_points((48, 48))
    assert float(drift.abs().max()) * 47 / 2 < 0.05  # voxels


def test_map_refinement_gives_each_pair_of_a_batch_its_own_correction():
    from fmreg.core.grid import Grid
    from fmreg.optimize.instance import refine_map
    from fmreg.transforms.displacement import DisplacementTransform

    fixed = torch.cat([_blobs(), _blobs()])
    moving = torch.cat([_blobs(2.0), _blobs()])
    start = DisplacementTransform(torch.zeros(2, 2, 48, 48), Grid((48, 48)))
    refined = refine_map(start, (48, 48), _mse_objective(moving, fixed), iterations=90, lr=3e-3)
    u = (refined.normalized_points((48, 48)) - start.normalized_points((48, 48)))[:, 14:34, 14:34, 0] * 47 / 2
    assert_close(u[0].mean(), torch.tensor(2.0), atol=0.1, rtol=0)
    assert float(u[1].abs().max()) < 0.05


def test_the_blur_backward_is_the_convolution_adjoint_in_2d_and_3d():
    import torch.nn.functional as F

    from fmreg.losses.image import gaussian_blur

    for shape in ((2, 3, 11, 9), (1, 2, 7, 6, 5)):
        x = torch.randn(shape, dtype=torch.double, requires_grad=True)
        assert torch.autograd.gradcheck(lambda t: gaussian_blur(t, 1.2), (x,))
    # The same gradient as autograd through the plain convolution.
    x = torch.randn(1, 1, 12, 10, requires_grad=True)
    w = torch.randn(1, 1, 12, 10)
    (gaussian_blur(x, 1.5) * w).sum().backward()
    radius = 3
    t = torch.arange(-radius, radius + 1, dtype=torch.float32)
    k = torch.exp(-0.5 * (t / 1.5) ** 2)
    k = k / k.sum()
    y = x.detach().clone().requires_grad_(True)
    z = F.conv2d(F.conv2d(y, k.reshape(1, 1, -1, 1), padding="same"), k.reshape(1, 1, 1, -1), padding="same")
    (z * w).sum().backward()
    assert_close(x.grad, y.grad)


@pytest.mark.parametrize("settings, message", [
    ({"io_space": "network"}, "unknown io_space 'network': choose field, weights or both"),
    ({"io_smoothness": -1.0}, "io_smoothness must be >= 0"),
    ({"io_smoothness": float("nan")}, "io_smoothness must be >= 0"),
])
def test_both_networks_refuse_unknown_io_spaces_and_negative_smoothness(settings, message):
    from fmreg.errors import FmregError
    from fmreg.methods.gradicon import GradICONMethod
    from fmreg.methods.mask_guided import MaskGuidedMethod

    for method in (GradICONMethod, MaskGuidedMethod):
        with pytest.raises(FmregError, match=f"^{message}$"):
            method(**settings)


def test_the_step_size_default_follows_the_space():
    from fmreg.methods.gradicon import GradICONMethod
    from fmreg.methods.mask_guided import MaskGuidedMethod

    assert GradICONMethod().io.lr == 3e-3 and GradICONMethod(io_space="weights").io.lr == 2e-5
    # Each network's default space is the one chosen on data other than ACDC (docs/benchmarks.md).
    assert GradICONMethod().io.space == "field" and MaskGuidedMethod().io.space == "both"
    both = MaskGuidedMethod().io
    assert (both.weights_lr, both.field_lr) == (1e-4, 3e-3) and both.tunes_weights and both.refines_map
    assert MaskGuidedMethod(io_space="field").io.lr == 3e-3 and not MaskGuidedMethod(io_space="field").io.tunes_weights
    # io_lr sets the weights' step where the weights are tuned; the map's stage of both keeps its own.
    assert (MaskGuidedMethod(io_lr=0.5).io.weights_lr, MaskGuidedMethod(io_lr=0.5).io.field_lr) == (0.5, 3e-3)
    assert GradICONMethod(io_lr=0.5).io.field_lr == 0.5 and GradICONMethod(io_lr=0.5).parameters()["io_lr"] == 0.5
    assert not GradICONMethod(io_iterations=0, io_space="both").io.refines_map


def test_refinement_inputs_take_the_fixed_resolution_between_one_and_four_times_the_network_voxels():
    from fmreg import phantoms
    from fmreg.core.grid import Grid
    from fmreg.core.image import Image
    from fmreg.nn.images import network_input, refinement_inputs

    def image(shape):
        return Image(torch.rand(shape) + torch.linspace(0, 1, shape[-1]), Grid(shape))

    f, m = refinement_inputs(image((300, 200)), image((90, 400)), (128, 128))
    assert f.shape == m.shape == (1, 1, 256, 200)  # at most 2x per axis in 2D, never below the network's
    assert refinement_inputs(image((64, 64)), image((64, 64)), (128, 128))[0].shape == (1, 1, 128, 128)
    assert refinement_inputs(image((40, 40, 40)), image((40, 40, 40)), (16, 16, 16))[0].shape == (1, 1, 25, 25, 25)
    fixed = image((256, 216))
    assert_close(refinement_inputs(fixed, fixed, (128, 128))[0], network_input(fixed, (256, 216)))
    # A 3D stack for a 2D network: its slices, in-plane at the fixed slices' resolution.
    stack = phantoms.make_pair(3, seed=1).fixed
    axis = 0
    f, m = refinement_inputs(stack, stack, (16, 16), axis)
    assert f.shape[0] == stack.grid.shape[axis] and f.shape[1] == 1
    assert tuple(f.shape[2:]) == tuple(min(max(n, 16), 32) for n in stack.grid.shape[1:])


def test_refinement_on_finer_images_recovers_a_shift_in_pixels_of_those_images():
    from fmreg.optimize.instance import refine_on_images

    fixed, moving = _blobs(), _blobs(2.0)  # 48 x 48: twice a 24 x 24 network's input
    refined = refine_on_images(_identity_map(24), fixed, moving, (24, 24), iterations=90, lr=3e-3)
    u = refined.normalized_points((48, 48))[0] - _identity_map().normalized_points((48, 48))[0]
    assert_close(u[14:34, 14:34, 0].mean() * 47 / 2, torch.tensor(2.0), atol=0.15, rtol=0)
