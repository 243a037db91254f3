"""The global transform from ROI correspondences (fmreg.correspond.consensus): exact answers."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from fmreg.core.grid import Frame, Grid
from fmreg.correspond.consensus import (RegionMoments, _nearest_partners, fit_similarity, agreement,
                                        consensus_similarity, region_moments, to_physical)
from planar import similarity  # tests/ is on sys.path (rootdir-relative import)


def _regions(rng: np.random.Generator, n: int, protos: torch.Tensor) -> RegionMoments:
    cents = rng.uniform(20, 180, (n, 2))
    covs = []
    for _ in range(n):
        a = rng.uniform(0, math.pi)
        r = np.array([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]])
        covs.append(r @ np.diag(rng.uniform(4, 60, 2)) @ r.T)
    return RegionMoments(cents, np.array(covs), np.zeros(n, np.int64), protos)


def _moved(regions: RegionMoments, m: np.ndarray) -> RegionMoments:
    a = m[:2, :2]
    return RegionMoments(regions.centroids @ a.T + m[:2, 2], a @ regions.covariances @ a.T, regions.slices,
                         regions.prototypes)


def test_the_similarity_that_moved_the_regions_is_recovered_among_distractors():
    rng = np.random.default_rng(0)
    protos = torch.nn.functional.normalize(torch.randn(8, 16, generator=torch.Generator().manual_seed(0)), dim=1)
    fixed = _regions(rng, 8, protos)
    truth = similarity(15.0, 1.07, (12.0, -7.0))
    moving = _moved(fixed, truth)
    # Four moving regions that look like fixed ones but sit elsewhere (wrong candidates).
    decoys = _regions(rng, 4, protos[:4].clone())
    moving = RegionMoments(np.concatenate([moving.centroids, decoys.centroids]),
                           np.concatenate([moving.covariances, decoys.covariances]),
                           np.zeros(12, np.int64), torch.cat([moving.prototypes, decoys.prototypes]))
    match = consensus_similarity(fixed, moving, top_k=2)
    np.testing.assert_allclose(match.matrix, truth, atol=1e-9)
    assert sorted(zip(match.fixed_index.tolist(), match.moving_index.tolist())) == [(i, i) for i in range(8)]
    np.testing.assert_allclose(match.agreement, 1.0, atol=1e-9)
    assert match.scale == pytest.approx(1.07) and match.angle_deg == pytest.approx(15.0)


def test_a_region_cut_differently_does_not_pull_the_transform():
    # Nine regions moved by the truth; the large one is segmented differently in the moving image,
    # so its centroid is 13 mm off. Least squares on centroids follows it; the score does not.
    rng = np.random.default_rng(3)
    protos = torch.nn.functional.normalize(torch.randn(9, 16, generator=torch.Generator().manual_seed(3)), dim=1)
    fixed = _regions(rng, 9, protos)
    fixed.covariances[8] = np.diag([900.0, 400.0])
    truth = similarity(-9.0, 1.08, (10.0, 25.0))
    moving = _moved(fixed, truth)
    moving.centroids[8] += (12.0, -6.0)
    least_squares = fit_similarity(fixed.centroids, moving.centroids, np.ones(9))
    assert np.abs(least_squares[:2, 2] - truth[:2, 2]).max() > 2.0
    match = consensus_similarity(fixed, moving, top_k=2)
    np.testing.assert_allclose(match.matrix[:2, :2], truth[:2, :2], atol=1e-3)
    np.testing.assert_allclose(match.matrix[:2, 2], truth[:2, 2], atol=0.1)
    assert len(match.fixed_index) == 9


def test_nearest_partners_keeps_each_fixed_regions_best_overlaps():
    rng = np.random.default_rng(4)
    protos = torch.nn.functional.normalize(torch.randn(3, 8, generator=torch.Generator().manual_seed(4)), dim=1)
    fixed = _regions(rng, 3, protos)
    # Moving region j sits 0, 5, 10 or 40 mm right of fixed region j // 4 (same shape).
    offsets = np.array([0.0, 5.0, 10.0, 40.0] * 3)
    owner = np.repeat(np.arange(3), 4)
    moving = RegionMoments(fixed.centroids[owner] + np.stack([offsets, np.zeros(12)], 1), fixed.covariances[owner],
                           np.zeros(12, np.int64), protos[owner])
    fj, mi = np.repeat(np.arange(3), 12), np.tile(np.arange(12), 3)
    cands = (fj, mi, np.ones(36))
    kf, km, ks = _nearest_partners(np.eye(3), fixed, moving, cands, keep=2)
    assert kf.tolist() == [0, 0, 1, 1, 2, 2]
    assert km.tolist() == [0, 1, 4, 5, 8, 9]
    np.testing.assert_array_equal(ks, 1.0)


def test_regions_that_did_not_move_keep_the_identity():
    rng = np.random.default_rng(1)
    protos = torch.nn.functional.normalize(torch.randn(6, 8, generator=torch.Generator().manual_seed(1)), dim=1)
    fixed = _regions(rng, 6, protos)
    match = consensus_similarity(fixed, fixed, top_k=2)
    np.testing.assert_array_equal(match.matrix, np.eye(3))
    assert len(match.fixed_index) == 6


def test_too_few_agreeing_regions_keep_the_identity():
    rng = np.random.default_rng(2)
    protos = torch.nn.functional.normalize(torch.randn(2, 8, generator=torch.Generator().manual_seed(2)), dim=1)
    fixed = _regions(rng, 2, protos)
    match = consensus_similarity(fixed, _moved(fixed, similarity(10.0, 1.0, (30.0, 0.0))), min_pairs=3)
    np.testing.assert_array_equal(match.matrix, np.eye(3))


def test_region_moments_of_a_rectangle_on_an_anisotropic_grid():
    mask = torch.zeros(1, 20, 30, dtype=torch.bool)
    mask[0, 4:10, 5:25] = True  # rows 4..9 (6 px), columns 5..24 (20 px)
    m = region_moments([mask], [torch.ones(1, 3)], spacing_rc=(2.0, 0.5))
    np.testing.assert_allclose(m.centroids[0], [14.5 * 0.5, 6.5 * 2.0])
    # A uniform run of n pixels of side s has variance s² (n² − 1) / 12, plus the pixel's own s² / 12.
    np.testing.assert_allclose(m.covariances[0], np.diag([0.25 * 400 / 12, 4.0 * 36 / 12]), atol=1e-12)


def test_to_physical_on_an_oblique_2d_grid():
    a = math.radians(30.0)
    direction = (math.cos(a), -math.sin(a), math.sin(a), math.cos(a))
    fixed = Grid((40, 50), (0.8, 1.2), (5.0, -3.0), direction)
    moving = Grid((45, 45), (1.0, 1.0), (-2.0, 7.0))
    m = similarity(12.0, 0.95, (4.0, -6.0))
    h = to_physical(m, fixed, moving)
    index = torch.tensor([[3.0, 7.0], [20.0, 31.0]], dtype=torch.float64)  # (x, y) voxel indices
    p_fixed = fixed.convert_points(index, Frame.VOXEL, Frame.PHYSICAL).numpy()
    q_fixed = index.numpy() * np.array(fixed.spacing)  # the slice frame: mm from the first pixel
    q_moving = q_fixed @ m[:2, :2].T + m[:2, 2]
    expected = moving.convert_points(torch.as_tensor(q_moving / np.array(moving.spacing)), Frame.VOXEL, Frame.PHYSICAL)
    got = p_fixed @ h[:2, :2].T + h[:2, 2]
    np.testing.assert_allclose(got, expected.numpy(), atol=1e-9)


def test_to_physical_in_3d_moves_every_slice_alike_and_keeps_the_slice():
    fixed = Grid((7, 30, 40), (1.5, 1.5, 10.0), (0.0, 0.0, -20.0))
    moving = Grid((7, 30, 40), (1.5, 1.5, 10.0), (3.0, 1.0, -20.0))
    m = similarity(-8.0, 1.02, (2.5, 1.0))
    h = to_physical(m, fixed, moving, axis=0)
    for z in (0.0, 4.0):
        index = np.array([[6.0, 9.0, z]])
        p = fixed.convert_points(torch.as_tensor(index), Frame.VOXEL, Frame.PHYSICAL).numpy()
        q = p @ h[:3, :3].T + h[:3, 3]
        idx = moving.convert_points(torch.as_tensor(q), Frame.PHYSICAL, Frame.VOXEL).numpy()[0]
        in_plane = m[:2, :2] @ (index[0, :2] * 1.5) + m[:2, 2]
        np.testing.assert_allclose(idx, [*(in_plane / 1.5), z], atol=1e-9)


def test_agreement_under_a_given_map_pairs_the_regions_it_overlaps():
    rng = np.random.default_rng(5)
    protos = torch.nn.functional.normalize(torch.randn(6, 8, generator=torch.Generator().manual_seed(5)), dim=1)
    fixed = _regions(rng, 6, protos)
    # Regions 0-2 stay, 3-5 move 60 mm: under the identity only the first three agree.
    moving = RegionMoments(fixed.centroids + np.array([[0.0, 0.0]] * 3 + [[60.0, 0.0]] * 3), fixed.covariances,
                           fixed.slices, protos)
    still = agreement(np.eye(3), fixed, moving, min_agreement=0.7)
    assert sorted(zip(still.fixed_index.tolist(), still.moving_index.tolist())) == [(0, 0), (1, 1), (2, 2)]
    np.testing.assert_allclose(still.agreement, 1.0, atol=1e-9)
    np.testing.assert_array_equal(still.matrix, np.eye(3))


def test_two_point_hypotheses_skip_coincident_points_without_a_warning():
    import warnings

    from fmreg.correspond.consensus import _two_point_hypotheses

    zf = np.array([3 + 4j, 3 + 4j, 3 + 4j])  # every fixed candidate at one centroid: spread 0
    zm = np.array([1 + 1j, 2 + 2j, 5 + 0j])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        hyps = _two_point_hypotheses(zf, zm, np.ones(3), 50, 0.0, np.random.default_rng(0))
    assert hyps.shape == (0, 3, 3)
    # Two distinct points give the exact similarity through them: z_m = a z_f + b.
    hyps = _two_point_hypotheses(np.array([0j, 10 + 0j]), np.array([1 + 1j, 1 + 21j]), np.ones(2), 20, 1.0,
                                 np.random.default_rng(0))
    assert len(hyps) > 0
    np.testing.assert_allclose(hyps[0][:2, :2], [[0.0, -2.0], [2.0, 0.0]], atol=1e-12)
    np.testing.assert_allclose(hyps[0][:2, 2], [1.0, 1.0], atol=1e-12)
