"""Synthetic SynthMorph-style training pairs: reproducibility, geometry and contrast."""

import pytest
import torch

from fmreg.core.grid import Frame, Grid
from fmreg.core.sampling import identity_points, sample_normalized
from fmreg.training.augment import augment, flip_permute, flip_permute_points
from fmreg.training.synthetic import (
    SyntheticConfig, SyntheticPairs, integrate_velocity, random_deformation, random_label_map, random_velocity, render,
)
from fmreg.transforms.displacement import DisplacementField, jacobian_determinant

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SMALL_2D = SyntheticConfig.default(2, shape=(64, 64))
SMALL_3D = SyntheticConfig.default(3, shape=(24, 32, 32), label_smoothness=8.0)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _min_jacobian(points: torch.Tensor) -> float:
    shape = tuple(points.shape[1:-1])
    disp = (points - identity_points(shape))[0].movedim(-1, 0)
    return float(jacobian_determinant(DisplacementField(disp, Grid(shape), Frame.NORMALIZED)).min())


def _warp_labels(labels: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    return sample_normalized(labels.float(), points, mode="nearest", padding="border").long()


def test_same_seed_same_stream_and_other_seed_differs():
    a, b, c = (SyntheticPairs(SMALL_2D, seed=s) for s in (7, 7, 8))
    for _ in range(2):
        batch_a, batch_b, batch_c = a.batch(2), b.batch(2), c.batch(2)
        for x, y in zip(batch_a, batch_b):
            assert torch.equal(x, y)
        assert not torch.equal(batch_a[0], batch_c[0])
    # Consecutive batches of one stream differ.
    assert not torch.equal(a.batch(2)[0], batch_a[0])


def test_state_dict_resumes_the_identical_stream():
    a = SyntheticPairs(SMALL_2D, seed=3)
    a.batch(2)
    state = a.state_dict()
    expected = a.batch(3)
    b = SyntheticPairs(SMALL_2D, seed=99)
    b.load_state_dict(state)
    for x, y in zip(expected, b.batch(3)):
        assert torch.equal(x, y)
    with pytest.raises(Exception, match="another configuration"):
        SyntheticPairs(SMALL_3D).load_state_dict(state)


def test_ranks_split_the_global_batch_exactly():
    whole = SyntheticPairs(SMALL_2D, seed=5).batch(4)
    parts = [SyntheticPairs(SMALL_2D, seed=5).batch(2, rank=r, world_size=2) for r in (0, 1)]
    for k in range(4):
        assert torch.equal(torch.cat([parts[0][k], parts[1][k]]), whole[k])


@pytest.mark.parametrize("config", [SMALL_2D, SMALL_3D], ids=["2d", "3d"])
def test_shapes_dtypes_ranges_and_label_counts(config):
    moving, fixed, ml, fl = SyntheticPairs(config, seed=1).batch(2)
    for image in (moving, fixed):
        assert image.shape == (2, 1, *config.shape) and image.dtype == torch.float32
        for i in range(2):
            assert float(image[i].min()) == 0.0 and float(image[i].max()) == pytest.approx(1.0)
    for labels in (ml, fl):
        assert labels.shape == (2, 1, *config.shape) and labels.dtype == torch.int64
        assert 0 <= int(labels.min()) and int(labels.max()) < config.labels[1]


@pytest.mark.parametrize("shape", [(96, 96), (32, 40, 40)])
def test_random_label_map_has_about_the_requested_number_of_labels(shape):
    labels = random_label_map(shape, 20, 12.0, _gen(0))
    assert labels.shape == (1, 1, *shape) and labels.dtype == torch.int64
    present = labels.unique()
    assert int(present.max()) <= 19 and 14 <= present.numel() <= 20


def test_pair_labels_are_related_by_the_returned_deformation():
    for config in (SMALL_2D, SMALL_3D):
        pair = SyntheticPairs(config, seed=11).pair(0, truth=True)
        assert pair.fixed_to_moving.shape == (1, *config.shape, len(config.shape))
        before = (pair.moving_labels == pair.fixed_labels).float().mean()
        after = (_warp_labels(pair.moving_labels, pair.fixed_to_moving) == pair.fixed_labels).float().mean()
        # Differently deformed (not the same map) but the returned map aligns them up to
        # boundary voxels and the border outside the field of view.
        assert before < 0.85 and after > 0.9
        assert _min_jacobian(pair.fixed_to_moving) > 0


@pytest.mark.parametrize("shape", [(64, 64), (24, 32, 32)])
def test_random_deformation_is_diffeomorphic_with_the_requested_amplitude(shape):
    points = random_deformation(shape, 3.0, 16.0, _gen(2))
    assert points.shape == (1, *shape, len(shape))
    assert _min_jacobian(points) > 0
    disp = (points - identity_points(shape))[0].movedim(-1, 0)
    field = DisplacementField(disp, Grid(shape), Frame.NORMALIZED)
    voxels = field.to(Frame.VOXEL).data
    rms = float(voxels.pow(2).mean().sqrt())
    assert 1.0 < rms < 9.0  # velocity RMS 3 voxels per component


def test_velocity_amplitude_is_exact_and_inverse_is_exp_of_minus_v():
    shape = (48, 64)
    v = random_velocity(shape, 2.5, 16.0, _gen(4))
    voxels = v / (2.0 / (torch.tensor(shape[::-1]) - 1.0))
    assert voxels.pow(2).mean(dim=tuple(range(v.dim() - 1))).sqrt() == pytest.approx(torch.full((2,), 2.5), rel=1e-4)
    forward, backward = integrate_velocity(v, shape), integrate_velocity(-v, shape)
    round_trip = backward + sample_normalized((forward - identity_points(shape)).movedim(-1, 1), backward,
                                              padding="border").movedim(1, -1)
    error_voxels = (round_trip - identity_points(shape)) / (2.0 / (torch.tensor(shape[::-1]) - 1.0))
    # Interpolation error of a coarse integration, small inside; the border is extended outside.
    assert float(error_voxels[:, 8:-8, 8:-8].abs().max()) < 0.25 and float(error_voxels.abs().mean()) < 0.05


def test_flips_and_permutations_apply_identically_to_both_images():
    config = SyntheticConfig.default(2, shape=(32, 32), flip_probability=1.0, permute_probability=1.0,
                                     max_rotation=0.0, scale_range=(1.0, 1.0), max_shift=0.0)
    image = torch.arange(32 * 32, dtype=torch.float32).reshape(1, 1, 32, 32) / 1024
    moving, fixed = augment(image, image.clone(), _gen(0), config)
    assert torch.equal(moving, fixed)
    assert torch.allclose(moving, image.flip(2, 3).transpose(2, 3), atol=1e-5) or \
        torch.allclose(moving, image.flip(2, 3), atol=1e-5)
    # With an affine, the two images get different affines but the same flips.
    moving, fixed = augment(image, image.clone(), _gen(1), SyntheticConfig.default(2, shape=(32, 32)))
    assert not torch.equal(moving, fixed)


def test_flip_permute_points_keeps_the_pair_relation():
    pair = SyntheticPairs(SMALL_3D, seed=2).pair(1, truth=True)
    perm, flips = (0, 2, 1), (True, False, True)
    moving = flip_permute(pair.moving_labels, perm, flips)
    fixed = flip_permute(pair.fixed_labels, perm, flips)
    t = flip_permute_points(pair.fixed_to_moving, perm, flips)
    agree = (_warp_labels(moving, t) == fixed).float().mean()
    base = (_warp_labels(pair.moving_labels, pair.fixed_to_moving) == pair.fixed_labels).float().mean()
    assert float(agree) == pytest.approx(float(base), abs=1e-6)


def test_render_gives_each_image_its_own_contrast():
    labels = torch.zeros(2, 1, 16, 16, dtype=torch.int64)
    labels[:, :, :, 8:] = 1
    labels[:, :, 8:, :] += 2  # four labels in quadrants
    flat = SyntheticConfig.default(2, shape=(16, 16), std_range=(0.0, 0.0), blur_range=(0.0, 0.0),
                                   bias_strength=0.0, gamma_std=0.0, noise_std=0.0)
    images = render(labels, _gen(0), flat)
    means = torch.stack([torch.stack([images[i][labels[i] == k].mean() for k in range(4)]) for i in range(2)])
    for i in range(2):
        for k in range(4):
            assert torch.allclose(images[i][labels[i] == k], means[i, k])  # constant per label
        assert float(means[i].min()) == 0.0 and float(means[i].max()) == 1.0
    assert not torch.allclose(means[0], means[1], atol=0.05)
    # A full pair: the same label has different intensities in moving and fixed.
    pair = SyntheticPairs(SMALL_2D, seed=0).pair(0)
    common = [k for k in pair.moving_labels.unique().tolist() if (pair.fixed_labels == k).sum() > 50]
    diffs = [float(pair.moving[pair.moving_labels == k].mean() - pair.fixed[pair.fixed_labels == k].mean())
             for k in common]
    assert max(abs(d) for d in diffs) > 0.1
