"""SAMReg on real textures moved by known similarity transforms (fmreg.evaluate.known_transforms).

Translations up to 15 % of the image, rotations up to 20°, scales 0.9-1.1, plus a smooth local
field of 3 mm: beyond what the image term alone reaches from the identity, so the ROI
correspondences have to carry the global move.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from fmreg.app.known_pairs import aperture_mask
from fmreg.core.grid import Grid
from fmreg.core.image import Image
from fmreg.evaluate.known_transforms import (
    SimilarityParams,
    known_transform_pair,
    random_similarity,
    target_registration_error,
)
from fmreg.methods.base import get_method
from fmreg.transforms.warp import warp

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
SOURCES = {
    "aerial": "2d/aerial/zh7_01_04_T.png",
    "cell": "2d/cell/PNT1A_do_1_f00_01_01_T.png",
    "lung": "2d/lung_ct/ct_scan_a2_s96.png",
    "brain": "2d/brain_mr/brain_img_0_100.png",
}


def _pair(kind: str, seed: int):
    from fmreg.io.images import read_image

    path = SHARED / SOURCES[kind]
    if not path.exists():
        pytest.skip(f"{path} is not here (the shared data sits beside the repository)")
    source = read_image(path)
    crop = 0.75
    extent = tuple(crop * n * s for n, s in zip(source.grid.size, source.grid.spacing))
    params = random_similarity(np.random.default_rng(seed), extent, local_mm=3.0)
    return known_transform_pair(source, params, crop=crop, seed=seed)


# ---------------------------------------------------------------------------- the generator
def test_the_fixed_image_is_the_moving_image_pulled_back_by_the_truth():
    y, x = torch.meshgrid(torch.arange(60.0), torch.arange(80.0), indexing="ij")
    source = Image(torch.sin(x / 5) * torch.cos(y / 7) + x / 40, Grid((60, 80), (1.0, 1.0)))
    kp = known_transform_pair(source, SimilarityParams(12.0, 1.05, (3.0, -2.0), 1.5), crop=0.6, seed=3)
    warped = warp(kp.moving, kp.truth).data
    # Where T(x) is at least one pixel inside the moving crop (the source goes on beyond it).
    mapped = kp.truth.mapped_points()
    hi = torch.tensor(kp.moving.grid.size, dtype=mapped.dtype)[:, None, None] - 2
    inside = ((mapped >= 1) & (mapped <= hi)).all(dim=0)
    torch.testing.assert_close(warped[inside], kp.fixed.data[inside], atol=1e-4, rtol=0)
    # The similarity part, checked at the crop centre (where the rotation has no effect).
    centre = [(n - 1) // 2 for n in kp.truth.grid.shape]
    assert kp.truth.data[:, centre[0], centre[1]].sub(torch.tensor([3.0, -2.0])).abs().max() <= 1.5 + 0.6


def test_target_registration_error_of_the_truth_is_zero_and_of_the_identity_its_size():
    y, x = torch.meshgrid(torch.arange(40.0), torch.arange(40.0), indexing="ij")
    kp = known_transform_pair(Image(x + y, Grid((40, 40))), SimilarityParams(0.0, 1.0, (4.0, 3.0)), crop=0.5)
    assert target_registration_error(kp.truth, kp.truth)["mean"] == 0.0
    from fmreg.transforms.displacement import DisplacementField

    ident = target_registration_error(DisplacementField.identity(kp.truth.grid), kp.truth)
    assert ident["mean"] == pytest.approx(5.0) and ident["identity_mean"] == pytest.approx(5.0)


# ---------------------------------------------------------------------------- SAMReg
@pytest.mark.slow
def test_samreg_brings_every_large_similarity_within_2_px():
    """Two pairs per texture (seeds 1 and 2). Measured: all 8 under 1.2 px (mean 0.95 px), from
    31-59 px at the identity. Before the consensus was refined on the ROI outlines, aerial seed 1
    ended at 8 px (its consensus was 6° off); before the consensus refinement and the
    border-padded image term, 3 of 8 were within 2 px (docs/benchmarks.md)."""
    errors = {}
    for kind in sorted(SOURCES):
        for seed in (1, 2):
            kp = _pair(kind, seed)
            tre = target_registration_error(get_method("samreg").register(kp.fixed, kp.moving).field, kp.truth)
            assert tre["identity_mean"] > 25.0
            errors[kind, seed] = tre["mean"]
    assert all(e < 2.0 for e in errors.values()), errors


@pytest.mark.slow
def test_without_the_roi_consensus_the_image_term_stays_far_away():
    kp = _pair("cell", seed=1)
    tre = target_registration_error(get_method("samreg", global_transform=False).register(kp.fixed, kp.moving).field,
                                    kp.truth)
    assert tre["mean"] > 5.0, tre


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["aerial", "cell"])
def test_roi_pairs_alone_carry_most_of_the_move(kind):
    """Image term off: only the ROI pairs (consensus start and pairs) move the image."""
    kp = _pair(kind, seed=1)
    result = get_method("samreg", image_weight=0.0, pair_source="consensus").register(kp.fixed, kp.moving)
    tre = target_registration_error(result.field, kp.truth)
    assert tre["mean"] < tre["identity_mean"] / 3, tre


@pytest.mark.slow
def test_roi_pairs_redrawn_alike_carry_the_local_field_too():
    """Image term off, masks redrawn as one kind of iso-intensity region in both images
    (``redraw_masks``). Measured: 1.10 px (identity 46 px; 2.11 px with the masks as found)."""
    kp = _pair("cell", seed=1)
    result = get_method("samreg", image_weight=0.0, pair_source="consensus", redraw_masks=True).register(kp.fixed, kp.moving)
    assert target_registration_error(result.field, kp.truth)["mean"] < 2.0


def test_mask_guided_takes_the_roi_pairs_that_agree_with_the_global_move():
    from fmreg.methods.mask_guided import MaskGuidedMethod

    kp = _pair("cell", seed=1)
    consensus = MaskGuidedMethod(pair_source="consensus")._pairs(kp.fixed, kp.moving, None, None)
    matched = MaskGuidedMethod(pair_source="matched")._pairs(kp.fixed, kp.moving, None, None)
    assert consensus and {p.source for p in consensus} == {"consensus"}
    assert matched and {p.source for p in matched} == {"match"}


@pytest.mark.slow
def test_through_one_aperture_the_frame_does_not_hold_samreg_at_the_identity(monkeypatch):
    """Aerial texture, a known similarity (seed 2, shifts up to 8 %), both images seen through the
    same centred disc. Measured over the points both discs show: 0.83 px (identity 20.9 px);
    3.97 px when the frame's edge counts in the image term."""
    kp = _pair_through_aperture("aerial", seed=2)
    assert _aperture_tre(kp) < 2.0
    monkeypatch.setattr("fmreg.optimize.stages.shared_frame_views", lambda fixed, moving: None)
    assert _aperture_tre(kp) > 2.5


def _pair_through_aperture(kind: str, seed: int):
    from fmreg.io.images import read_image

    path = SHARED / SOURCES[kind]
    if not path.exists():
        pytest.skip(f"{path} is not here (the shared data sits beside the repository)")
    source = read_image(path)
    extent = tuple(0.75 * n * s for n, s in zip(source.grid.size, source.grid.spacing))
    params = random_similarity(np.random.default_rng(seed), extent, max_shift_frac=0.08, local_mm=3.0)
    kp = known_transform_pair(source, params, seed=seed)
    fixed = Image(kp.fixed.data * aperture_mask(kp.fixed.grid, 0.47), kp.fixed.grid)
    moving = Image(kp.moving.data * aperture_mask(kp.moving.grid, 0.47), kp.moving.grid)
    return fixed, moving, kp.truth


def _aperture_tre(pair) -> float:
    """Mean TRE (px) of samreg over the fixed points in the disc whose true partner is in the
    moving disc (unit spacing)."""
    fixed, moving, truth = pair
    from fmreg.core.grid import Frame

    u = get_method("samreg").register(fixed, moving).field.to(Frame.PHYSICAL).data.double()
    true = truth.to(Frame.PHYSICAL).data.double()
    y = fixed.grid.coordinates(dtype=torch.float64) + true  # (x, y) mm = px
    h, w = moving.grid.shape
    in_moving_disc = (y[1] - (h - 1) / 2) ** 2 + (y[0] - (w - 1) / 2) ** 2 <= (0.47 * min(h, w)) ** 2
    seen = aperture_mask(fixed.grid, 0.47) & in_moving_disc
    return float((u - true).norm(dim=0)[seen].mean())


@pytest.mark.slow
def test_samreg_recovers_a_3d_similarity_of_a_brain_volume():
    """``brain3d`` at 4 mm, the fixed image the volume under a rotation of 10° about the first
    array axis, scale 1.04 and a (8, -6, 5) mm shift. Measured: 0.93 mm mean over the brain
    (identity 14.5 mm); 2.95 mm before the start was refined on the images (the moments start
    has no rotation)."""
    from fmreg.core.grid import Frame
    from fmreg.core.sampling import sample

    path = SHARED / "brain3d" / "test_scan.npz"
    if not path.exists():
        pytest.skip(f"{path} is not here (the shared data sits beside the repository)")
    vol = torch.from_numpy(np.load(path)["vol"].astype(np.float32))[::4, ::4, ::4].contiguous()
    grid = Grid(tuple(vol.shape), (4.0, 4.0, 4.0))
    t = np.deg2rad(10.0)
    rot = 1.04 * np.array([[np.cos(t), -np.sin(t), 0.0], [np.sin(t), np.cos(t), 0.0], [0.0, 0.0, 1.0]])
    centre = np.array([(n - 1) * 2.0 for n in reversed(vol.shape)])  # x, y, z in mm
    x = grid.coordinates(Frame.PHYSICAL).double()
    truth = torch.einsum("ij,j...->i...", torch.from_numpy(rot), x - torch.from_numpy(centre).reshape(3, 1, 1, 1))
    truth = truth + torch.from_numpy(centre + [8.0, -6.0, 5.0]).reshape(3, 1, 1, 1)  # T(x), mm
    fixed = Image(sample(vol, grid, truth.float(), fill=0.0), grid)
    field = get_method("samreg").register(fixed, Image(vol, grid)).field
    error = (x + field.to(Frame.PHYSICAL).data.double() - truth).norm(dim=0)[fixed.data > 0.1]
    identity = (x - truth).norm(dim=0)[fixed.data > 0.1]
    assert float(identity.mean()) > 10.0
    assert float(error.mean()) < 1.5, float(error.mean())
