"""Mask-guided registration (paper 001): prototype and contour losses, the network, the objective."""

import math

import pytest
import torch

from fmreg.core.sampling import identity_points, sample_normalized
from fmreg.losses.contour import chamfer_directions, contour_chamfer, soft_contour
from fmreg.losses.mask_guided import DEFAULT_WEIGHTS, mask_guided_loss, normalized_to_mm
from fmreg.losses.prototype import (
    level_masks,
    multilevel_prototype_losses,
    prototype_alignment,
    prototype_contrastive,
    prototypes,
)
from fmreg.nn.mask_guided import MaskGuidedNet, PooledCrossAttention
from fmreg.transforms.velocity import scaling_and_squaring

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def disc(shape, spacing, radius, centre_mm=None):
    """Binary disc/ball of ``radius`` mm about the grid centre (or ``centre_mm``), ``(1, 1, *shape)``."""
    centre_mm = centre_mm or [0.0] * len(shape)
    axes = [(torch.arange(n, dtype=torch.float64) - (n - 1) / 2) * s - c for n, s, c in zip(shape, spacing, centre_mm)]
    mesh = torch.meshgrid(*axes, indexing="ij")
    return (sum(a * a for a in mesh) <= radius**2).float()[None, None]


# ---------------------------------------------------------------------------- prototypes
def test_prototypes_are_the_hand_computed_masked_means():
    feats = torch.tensor([[[1.0, 2.0], [3.0, 4.0]], [[10.0, 20.0], [30.0, 40.0]]])[None]  # (1, 2, 2, 2)
    masks = torch.tensor([
        [[1.0, 0.0], [0.0, 1.0]],   # mean of (0,0) and (1,1)
        [[0.5, 0.0], [0.0, 0.25]],  # weights 0.5, 0.25: (0.5·1 + 0.25·4) / 0.75 = 2
        [[0.0, 0.0], [0.0, 0.0]],   # empty
    ])[None]
    p, valid = prototypes(feats, masks)
    torch.testing.assert_close(p[0], torch.tensor([[2.5, 25.0], [2.0, 20.0], [0.0, 0.0]]))
    assert valid.tolist() == [[True, True, False]]


def test_masks_are_area_resampled_to_coarser_features():
    masks = torch.zeros(1, 1, 4, 4)
    masks[0, 0, 0, 0] = 1.0  # one pixel: a quarter of feature cell (0, 0)
    torch.testing.assert_close(level_masks(masks, (2, 2))[0, 0], torch.tensor([[0.25, 0.0], [0.0, 0.0]]))
    feats = torch.arange(8.0).reshape(1, 2, 2, 2)
    p, valid = prototypes(feats, masks)
    torch.testing.assert_close(p[0, 0], torch.tensor([0.0, 4.0]))  # feature cell (0, 0)
    assert valid.all()


@pytest.mark.parametrize("tau", [0.1, 0.5, 1.0])
def test_infonce_of_identical_prototypes_with_orthogonal_negatives(tau):
    # Prototypes of ROI k: scaled basis vectors e_k, so cos(p_k, p_j) = δ_kj:
    # ℓ_k = −log(e^{1/τ} / (e^{1/τ} + (K−1)·e^0)) = log(1 + (K−1) e^{−1/τ}).
    k = 4
    p = torch.eye(k, 6)[None] * torch.tensor([1.0, 2.0, 0.5, 3.0])[None, :, None]
    valid = torch.ones(1, k, dtype=torch.bool)
    got = prototype_contrastive(p, p.clone(), valid, tau)
    torch.testing.assert_close(got, torch.tensor(math.log(1 + (k - 1) * math.exp(-1 / tau))))


def test_infonce_skips_invalid_rois_and_is_zero_for_a_single_roi():
    tau = 0.2
    p = torch.eye(4, 4)[None].repeat(2, 1, 1)
    valid = torch.tensor([[True, True, True, False], [True, False, False, False]])
    p[0, 3] = p[0, 0]  # an invalid ROI identical to ROI 0 must not act as a negative
    # Pair 0: three valid anchors, two negatives each; pair 1: one anchor, no negative (ℓ = 0).
    expected = 3 * math.log(1 + 2 * math.exp(-1 / tau)) / 4
    torch.testing.assert_close(prototype_contrastive(p, p, valid, tau), torch.tensor(expected))


def test_alignment_identical_is_zero_and_opposite_is_two():
    p = torch.randn(2, 3, 5)
    valid = torch.tensor([[True, True, False], [True, True, True]])
    torch.testing.assert_close(prototype_alignment(p, 3 * p, valid), torch.tensor(0.0), atol=1e-6, rtol=0)
    q = -0.5 * p
    q[0, 2] = p[0, 2]  # invalid: ignored
    torch.testing.assert_close(prototype_alignment(p, q, valid), torch.tensor(2.0))


def test_multilevel_sums_over_levels_and_keeps_the_graph_without_valid_rois():
    feats = [torch.eye(3, 8)[None, :, :, None].expand(1, 3, 8, 8).contiguous(), torch.rand(1, 5, 4, 4)]
    masks = torch.zeros(1, 3, 8, 8)
    for k in range(3):
        masks[0, k, k] = 1.0  # ROI k is row k: at level 0 its prototype is e_k
    c, a = multilevel_prototype_losses(feats, feats, masks, masks, tau=0.5)
    c0 = math.log(1 + 2 * math.exp(-2.0))
    p1, v1 = prototypes(feats[1], masks)
    c1 = prototype_contrastive(p1, p1, v1, 0.5)
    torch.testing.assert_close(c, c0 + c1)
    torch.testing.assert_close(a, torch.tensor(0.0), atol=1e-6, rtol=0)
    empty = torch.zeros(1, 3, 8, 8)
    f = [x.clone().requires_grad_() for x in feats]
    c, a = multilevel_prototype_losses(f, f, empty, empty)
    (c + a).backward()
    assert float(c.detach()) == 0.0 and float(a.detach()) == 0.0 and f[0].grad is not None


# ---------------------------------------------------------------------------- contour
CASES = [
    ((96, 96), (0.5, 0.5), 8.0, 14.0),
    ((64, 128), (1.0, 0.5), 6.0, 9.0),
    ((48, 64), (1.0, 0.75), 10.0, 11.0),
    ((24, 40, 40), (1.5, 1.0, 1.0), 7.0, 12.0),
]


@pytest.mark.parametrize("shape,spacing,r,big", CASES)
def test_chamfer_of_concentric_circles_is_the_squared_radius_gap_each_way(shape, spacing, r, big):
    # Every point of either circle is R − r from the other, so each directed mean squared distance
    # is (R − r)². Discretisation: a contour voxel centre lies inside its circle with a face
    # neighbour outside, i.e. within h = max spacing of the circle, radially; both contours are
    # shifted inward alike, so each point's distance to the other contour is within h of R − r
    # and so is the root of the mean of its square.
    h = max(spacing)
    inner, outer = disc(shape, spacing, r), disc(shape, spacing, big)
    fwd, bwd, valid = chamfer_directions(inner, outer, spacing)
    _, bwd_t, _ = chamfer_directions(inner, outer, spacing, moving_masks=inner, points=identity_points(shape))
    assert valid.all()
    for value in (fwd, bwd, bwd_t):
        assert abs(float(value.sqrt()) - (big - r)) <= h, (float(value.sqrt()), big - r)
    torch.testing.assert_close(bwd_t, bwd)  # the moving distance map at T = id is the warped one
    torch.testing.assert_close(contour_chamfer(inner, outer, spacing), (fwd + bwd)[0, 0])


def test_chamfer_of_identical_masks_is_zero_and_empty_masks_are_skipped():
    spacing = (1.0, 0.7)
    m = torch.cat([disc((40, 50), spacing, 9.0), torch.zeros(1, 1, 40, 50)], dim=1)
    fwd, bwd, valid = chamfer_directions(m, m, spacing)
    assert valid.tolist() == [[True, False]]
    assert float(fwd[0, 0]) == 0.0 and float(bwd[0, 0]) == 0.0
    assert float(contour_chamfer(m, m, spacing)) == 0.0


def test_soft_contour_of_a_binary_square_is_its_inner_ring():
    m = torch.zeros(1, 1, 6, 6)
    m[..., 1:5, 1:5] = 1.0
    ring = m.clone()
    ring[..., 2:4, 2:4] = 0.0
    torch.testing.assert_close(soft_contour(m), ring)
    full = torch.ones(1, 1, 4, 4)  # the image edge is no contour
    assert float(soft_contour(full).abs().sum()) == 0.0


def test_chamfer_gradient_moves_the_warp_towards_the_fixed_contour():
    shape, spacing = (48, 48), (1.0, 1.0)
    fixed = disc(shape, spacing, 8.0)
    moving = disc(shape, spacing, 8.0, centre_mm=(0.0, 3.0))  # shifted +3 mm along x
    # T(x) = x + t: the warped mask is moving(x + t), aligned at t_x = +3 mm.
    t = torch.zeros(2, requires_grad=True)
    points = identity_points(shape) + t
    warped = sample_normalized(moving, points)
    fwd, bwd, _ = chamfer_directions(warped, fixed, spacing, moving_masks=moving, points=points)
    g_fwd = torch.autograd.grad(fwd.sum(), t, retain_graph=True)[0]
    g_bwd = torch.autograd.grad(bwd.sum(), t)[0]
    assert g_fwd[0] < 0 and g_bwd[0] < 0  # increasing t_x reduces both directions
    # By symmetry nothing along y, up to the one-sided derivative of linear interpolation at t = 0
    # (every sample point is on a voxel centre, where the interpolant has a kink).
    assert abs(float(g_bwd[1])) < 0.02 * abs(float(g_bwd[0]))


# ---------------------------------------------------------------------------- network
def inputs(dimension, shape, k=3, batch=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    full = (batch, 1, *shape)
    masks = (batch, k, *shape)
    return (torch.rand(full, generator=g), torch.rand(full, generator=g),
            (torch.rand(masks, generator=g) > 0.5).float(), (torch.rand(masks, generator=g) > 0.5).float())


def activate_heads(net, std=0.05):
    torch.manual_seed(1)
    for head in net.heads:
        torch.nn.init.normal_(head[-1].weight, std=std)


@pytest.mark.parametrize("dimension,shape", [(2, (24, 20)), (3, (12, 16, 10)), (2, (17, 13))])
@pytest.mark.parametrize("fusion", ["attention", "conv"])
def test_network_shapes_and_identity_at_initialisation(dimension, shape, fusion):
    net = MaskGuidedNet(dimension, 3, widths=(4, 8, 8, 16), fusion=fusion)
    m, f, mm, fm = inputs(dimension, shape)
    out = net(m, f, mm, fm, return_features=True)
    assert out.displacement.shape == (2, dimension, *shape)
    assert float(out.displacement.detach().abs().max()) == 0.0
    torch.testing.assert_close(out.transform.normalized_points(shape), identity_points(shape).expand(2, *shape, dimension))
    assert len(out.fixed_features) == len(out.warped_features) == 4
    for level, (a, b) in enumerate(zip(out.fixed_features, out.warped_features)):
        assert a.shape == b.shape and a.shape[1] == (4, 8, 8, 16)[level]
        assert a.shape[2:] == tuple(math.ceil(n / 2**level) for n in shape)
    torch.testing.assert_close(out.warped_features[0], net.moving_encoder(m)[0])  # T = id
    assert net(m, f, mm, fm).displacement.shape == (2, dimension, *shape)


@pytest.mark.parametrize("dimension,shape", [(2, (32, 32)), (3, (16, 16, 16))])
def test_attention_is_in_the_forward_pass_and_gets_gradients(dimension, shape):
    net = MaskGuidedNet(dimension, 2, widths=(4, 8, 8, 16), fusion="attention", attention_levels=2)
    calls = []
    for module in net.modules():
        if isinstance(module, PooledCrossAttention):
            module.register_forward_hook(lambda *_: calls.append(1))
    assert sum(isinstance(x, PooledCrossAttention) for x in net.modules()) == 10  # 5 per level, 2 levels
    activate_heads(net)
    m, f, mm, fm = inputs(dimension, shape, k=2)
    u = net(m, f, mm, fm).displacement
    assert len(calls) == 10
    u.square().sum().backward()
    for name, p in net.fusions.named_parameters():
        if "attention" in name and p.grad is not None:
            assert torch.isfinite(p.grad).all()
    grads = [p.grad for n, p in net.fusions[3].named_parameters() if n.startswith("image_from_mask.attention")]
    assert grads and all(g is not None and float(g.abs().sum()) > 0 for g in grads)
    fm2 = fm.clone()
    fm2[:, 0] = 1 - fm2[:, 0]  # another fixed mask changes the field
    with torch.no_grad():
        assert float((net(m, f, mm, fm2).displacement - u).abs().max()) > 1e-6


@pytest.mark.parametrize("dimension,shape", [(2, (16, 12)), (3, (8, 10, 6))])
def test_squaring_steps_integrate_each_level_output_as_a_velocity(dimension, shape):
    # One level, so the field is exactly the head's output, integrated or not.
    heads = []
    for steps in (0, 5):
        net = MaskGuidedNet(dimension, 2, widths=(4,), fusion="conv", squaring_steps=steps)
        activate_heads(net, std=0.5)
        net.heads[0].register_forward_hook(lambda _m, _i, out: heads.append(out.detach().movedim(1, -1)))
        m, f, mm, fm = inputs(dimension, shape, k=2)
        with torch.no_grad():
            u = net(m, f, mm, fm).displacement.movedim(1, -1)
        expected = heads[-1] if steps == 0 else scaling_and_squaring(heads[-1], steps)
        torch.testing.assert_close(u, expected)
    assert float((heads[0] - u).abs().max()) > 1e-3  # the integration changed the field
    with pytest.raises(ValueError, match="squaring_steps"):
        MaskGuidedNet(dimension, 2, squaring_steps=-1)


def test_network_rejects_mismatched_inputs():
    net = MaskGuidedNet(2, 3, widths=(4, 8))
    m, f, mm, fm = inputs(2, (16, 16))
    with pytest.raises(ValueError, match="moving masks have 2 channels, the model expects 3"):
        net(m, f, mm[:, :2], fm)
    with pytest.raises(ValueError, match="fixed masks have 4 channels"):
        net(m, f, mm, torch.cat([fm, fm[:, :1]], dim=1))
    with pytest.raises(ValueError, match="fixed masks have batch/grid"):
        net(m, f, mm, fm[..., :8])
    with pytest.raises(ValueError, match="moving image .* and fixed image .* differ"):
        net(m, f[..., :8], mm, fm)
    with pytest.raises(ValueError, match="fusion"):
        MaskGuidedNet(2, 3, fusion="mlp")


def test_attention_key_budget():
    att2, att3 = PooledCrossAttention(2, 8, max_keys=512), PooledCrossAttention(3, 8, max_keys=512)
    assert att2.key_shape((32, 32)) == (22, 22) and att3.key_shape((16, 16, 16)) == (8, 8, 8)
    assert att2.key_shape((16, 8)) == (16, 8)  # small levels attend over every token


# ---------------------------------------------------------------------------- objective
def test_normalized_to_mm():
    u = torch.ones(1, 2, 5, 9)  # one normalized unit = (n − 1) / 2 voxels along each axis
    mm = normalized_to_mm(u, (2.0, 0.5))
    torch.testing.assert_close(mm[0, :, 0, 0], torch.tensor([4 * 0.5, 2 * 2.0]))


def test_objective_terms_weights_and_gradients():
    torch.manual_seed(0)
    net = MaskGuidedNet(2, 2, widths=(4, 8, 8, 16))
    activate_heads(net, std=0.01)
    shape, spacing = (32, 32), (1.2, 1.0)
    fm = torch.cat([disc(shape, spacing, 6.0, (-4.0, -4.0)), disc(shape, spacing, 7.0, (5.0, 4.0))], dim=1)
    mm = torch.cat([disc(shape, spacing, 6.0, (-3.0, -5.0)), disc(shape, spacing, 7.0, (5.0, 6.0))], dim=1)
    f, m = fm.sum(1, keepdim=True), mm.sum(1, keepdim=True)
    weights = {"contour": 0.2, "alignment": 0.5}
    rec = mask_guided_loss(net, m, f, mm, fm, weights=weights, spacing=spacing)
    t = rec.terms
    assert set(t) == {"ncc", "diffusion", "dice", "contour", "contrastive", "alignment", "total"}
    w = {**DEFAULT_WEIGHTS, **weights}
    expected = (w["ncc"] * (1 - t["ncc"]) + w["diffusion"] * t["diffusion"] + w["dice"] * (1 - t["dice"])
                + w["contour"] * t["contour"] + w["contrastive"] * t["contrastive"] + w["alignment"] * t["alignment"])
    torch.testing.assert_close(rec.total, expected)
    assert float(t["contour"].detach()) > 0 and 0 < float(t["dice"].detach()) < 1
    rec.total.backward()
    grads = [p.grad for p in net.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    with pytest.raises(ValueError, match="unknown loss weights"):
        mask_guided_loss(net, m, f, mm, fm, weights={"hausdorff": 1.0})


def test_default_weights_are_the_published_ones():
    assert DEFAULT_WEIGHTS == {"ncc": 4.0, "diffusion": 1.0, "dice": 1.0, "contour": 0.001, "contrastive": 0.01,
                               "alignment": 0.01}
