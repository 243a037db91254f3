"""SAMReg as a method (fmreg.methods.samreg): the samreg() pipeline and its registry entries.

The fake segmenter and encoder of test_correspond_pairs give ROI pairs known in advance.
"""

from __future__ import annotations

import re

import pytest
import torch
from torch.testing import assert_close

from fmreg.correspond.matching import SIMILARITY_THRESHOLD
from fmreg.correspond.pairs import SamRegOptions
from fmreg.core.grid import Frame, Grid
from fmreg.core.image import Image
from fmreg.errors import FmregError
from fmreg.evaluate.metrics import dice
from fmreg.methods import get_method
from fmreg.methods.samreg import SAM_DEFAULTS, samreg
from fmreg.optimize.fit import FitOptions
from fmreg.phantoms import make_pair
from fmreg.segment.filtering import (
    MAX_AREA_FRAC,
    MAX_OVERLAP,
    MIN_AREA_FRAC,
    MIN_SCORE,
    MIN_STABILITY,
)
from fmreg.transforms.displacement import DisplacementField, jacobian_determinant
from fmreg.transforms.warp import warp_labels

# tests/ is on sys.path (rootdir-relative import), as for the tiny SAM below.
from test_correspond_pairs import LOOSE_AREA, FakeEncoder, FakeSegmenter, _pair_2d, _paint

# Tiny problems: thread start-up and contention cost more than the work; the fixture lives
# in conftest.py.
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_roi_defaults_are_the_paper_constants_defined_once():
    opt = SamRegOptions()
    assert (opt.min_area_frac, opt.max_area_frac) == (MIN_AREA_FRAC, MAX_AREA_FRAC)
    assert opt.max_overlap == MAX_OVERLAP and opt.threshold == SIMILARITY_THRESHOLD
    assert SAM_DEFAULTS == {"pred_iou_thresh": MIN_SCORE, "stability_score_thresh": MIN_STABILITY}


# ---------------------------------------------------------------------------- pipeline function
def test_samreg_with_fake_backends_pairs_and_fits_a_translation():
    # Both disks move by (2, 3) px; the image term is off so the pairs alone drive the fit.
    grid = Grid((64, 64), (1.0, 1.0))
    fixed = Image(_paint(grid.shape, [(1, (20, 20), 8), (2, (40, 42), 8)]), grid)
    moving = Image(_paint(grid.shape, [(1, (23, 22), 8), (2, (43, 44), 8)]), grid)
    fit = FitOptions(image_weight=0.0, verify_dice=None, reg_weight=0.5, lr=0.5)
    out = samreg(fixed, moving, FakeSegmenter(), FakeEncoder(), SamRegOptions(**LOOSE_AREA), fit)
    assert len(out.pairs) == 2
    assert set(out.timings) == {"segment_embed", "match", "fit"}
    assert out.fit_report["kept_pairs"] is None and "dice" in out.fit_report["levels"][-1]
    u = out.field.to(Frame.PHYSICAL)
    # Centre of disk 1 at (x=20, y=20) mm: moved 2 mm in x (columns), 3 mm in y (rows).
    assert_close(u.data[:, 20, 20], torch.tensor([2.0, 3.0]), atol=0.5, rtol=0)
    assert float(jacobian_determinant(u).min()) > 0


# ---------------------------------------------------------------------------- the methods
@pytest.fixture(scope="module")
def phantom2d():
    return make_pair(2)


@pytest.fixture(scope="module")
def samreg_result(phantom2d):
    p = phantom2d
    return get_method("samreg").register(p.fixed, p.moving)


LABELS = [1, 2, 3, 4, 5]


def _dice_after(p, field: DisplacementField) -> dict[int, float]:
    return dice(warp_labels(p.moving_labels, field).data, p.fixed_labels.data, LABELS)


def test_samreg_improves_dice_over_identity_on_the_phantom(phantom2d, samreg_result):
    p = phantom2d
    before = dice(p.moving_labels.data, p.fixed_labels.data, LABELS)
    after = _dice_after(p, samreg_result.field)
    # Lungs, myocardium and blood pool are the large structures that move.
    for label in (1, 2, 3):
        assert after[label] > before[label] + 0.01, (label, before[label], after[label])
    for label in LABELS:
        assert after[label] > before[label] - 0.02, (label, before[label], after[label])
    assert float(jacobian_determinant(samreg_result.field).min()) > 0


def test_samreg_result_reports_pairs_stage_times_as_data(phantom2d, samreg_result):
    r = samreg_result
    assert r.method == "samreg" and r.field.grid == phantom2d.fixed.grid
    assert r.roi_pairs and all(p.fixed_mask.shape == phantom2d.fixed.grid.shape for p in r.roi_pairs)
    details = r.details(phantom2d.fixed.grid, phantom2d.moving.grid)
    pairs = details["roi_pairs"]
    assert isinstance(pairs, list) and pairs
    keys = {"similarity", "fixed_area_voxels", "moving_area_voxels", "fixed_centroid_mm",
            "moving_centroid_mm", "fixed_slice", "moving_slice", "source"}
    for s in pairs:
        assert keys <= set(s)
        assert 0.0 < s["similarity"] <= 1.0 and s["fixed_area_voxels"] > 0
        assert len(s["fixed_centroid_mm"]) == 2 and s["fixed_slice"] is None
    assert {"segment_embed", "match", "fit"} <= set(details["stage_seconds"])
    assert all(v >= 0 for v in details["stage_seconds"].values())
    assert "levels" in details["fit"]
    assert r.parameters["segmenter"] == "classical" and r.parameters["encoder"] == "classical"


def test_samreg_labels_is_an_upper_bound_on_the_phantom(phantom2d):
    p = phantom2d
    method = get_method("samreg-labels")
    assert method.uses_labels
    r = method.register(p.fixed, p.moving, p.fixed_labels, p.moving_labels)
    after = _dice_after(p, r.field)
    assert all(after[label] > 0.9 for label in LABELS), after
    assert [pair.source for pair in r.roi_pairs] == [f"labels:{v}" for v in LABELS]
    assert r.parameters["segmenter"] == "labels"


def test_samreg_labels_refuses_to_run_without_labels(phantom2d):
    p = phantom2d
    method = get_method("samreg-labels")
    with pytest.raises(FmregError, match="needs both label maps"):
        method.register(p.fixed, p.moving)
    with pytest.raises(FmregError, match="needs both label maps"):
        method.register(p.fixed, p.moving, p.fixed_labels, None)


def test_unknown_parameters_are_user_errors_that_name_them():
    with pytest.raises(FmregError, match="bogus"):
        get_method("samreg", bogus=1)
    with pytest.raises(FmregError, match="bogus"):
        get_method("samreg-labels", bogus=1)
    with pytest.raises(FmregError, match="unknown segmenter 'magic'"):
        get_method("samreg", segmenter="magic").register(*_pair_2d())


@pytest.mark.parametrize(
    "params, message",
    [
        ({"fine_min_correlation": "abc"}, "fine_min_correlation must be a number or null, got 'abc'"),
        ({"levels": True}, "levels must be an integer, got True"),
        ({"levels": 2.5}, "levels must be an integer, got 2.5"),
        ({"threshold": None}, "threshold must be a number, got None"),
        ({"image_metric": 3}, "image_metric must be a string, got 3"),
    ],
)
def test_parameters_of_the_wrong_type_are_user_errors_that_name_them(params, message):
    with pytest.raises(FmregError, match=re.escape(message)):
        get_method("samreg", **params)


def test_parameters_of_the_right_type_pass_including_null_where_allowed():
    m = get_method("samreg", fine_min_correlation=None, lr=1, iterations=[3, 3, 3, 3])
    assert m.fit_options.fine_min_correlation is None and m.fit_options.lr == 1


def test_parameters_reach_the_options():
    m = get_method("samreg", threshold=0.7, slice_range=2, reg_weight=0.3, iterations=(5, 5, 5, 5))
    assert m.roi_options.threshold == 0.7 and m.roi_options.slice_range == 2
    assert m.fit_options.reg_weight == 0.3
    assert m.parameters()["fit"]["iterations"] == [5, 5, 5, 5]


# ---------------------------------------------------------------------------- the SAM backend
@pytest.fixture(scope="module")
def tiny_sam_dir(tmp_path_factory):
    pytest.importorskip("transformers")
    from test_segment_anything import _tiny_sam  # tests/ is on sys.path (rootdir-relative import)

    path = tmp_path_factory.mktemp("tiny-sam-pipeline")
    _tiny_sam().save_pretrained(path)
    return path


def _smooth_pair():
    grid = Grid((48, 56), (1.0, 1.2), (3.0, -4.0))
    yy, xx = torch.meshgrid(torch.arange(48.0), torch.arange(56.0), indexing="ij")
    f = 100 * torch.exp(-((yy - 20) ** 2 + (xx - 25) ** 2) / 60) + 20 * (xx > 40)
    m = 100 * torch.exp(-((yy - 22) ** 2 + (xx - 27) ** 2) / 60) + 20 * (xx > 41)
    return Image(f.float(), grid), Image(m.float(), grid)


def test_samreg_with_the_sam_backend_runs_end_to_end(tiny_sam_dir):
    fixed, moving = _smooth_pair()
    method = get_method(
        "samreg", segmenter="sam", model=str(tiny_sam_dir), min_score=0.0, min_stability=0.0,
        levels=2, iterations=(10, 5), refine_iterations=5,
    )
    r = method.register(fixed, moving)
    assert r.parameters["segmenter"] == "sam" and r.parameters["encoder"] == "sam"
    assert r.field.grid == fixed.grid and r.field.data.shape == (2, 48, 56)
    assert bool(torch.isfinite(r.field.data).all())
    assert float(jacobian_determinant(r.field).min()) > 0
    assert {"segment_embed", "match", "fit"} <= set(r.stage_seconds)


def test_sam_options_reach_the_backend_and_bad_ones_are_user_errors(tiny_sam_dir):
    fixed, _ = _smooth_pair()
    # With SAM's own thresholds at 0 the random model yields masks, so identical images pair up.
    method = get_method(
        "samreg-sam", model=str(tiny_sam_dir), sam_points_per_side=4, sam_pred_iou_thresh=0.0,
        sam_stability_score_thresh=0.0, sam_progress=False, min_score=0.0, min_stability=0.0,
        min_area_frac=0.0, max_area_frac=1.0, levels=2, iterations=(5, 5), refine_iterations=2,
    )
    r = method.register(fixed, fixed)
    assert r.parameters["sam"]["points_per_side"] == 4
    assert r.parameters["sam"]["pred_iou_thresh"] == 0.0
    assert len(r.roi_pairs) > 0
    assert all(p.similarity > 0.99 for p in r.roi_pairs)
    # Unspecified SAM options take the paper's 0.90 thresholds.
    assert get_method("samreg-sam", model="x").parameters()["sam"]["stability_score_thresh"] == 0.90
    with pytest.raises(FmregError, match="sam_bogus"):
        get_method("samreg-sam", model=str(tiny_sam_dir), sam_bogus=1).register(fixed, fixed)


def test_samreg_sam_without_a_model_is_a_user_error(monkeypatch):
    monkeypatch.delenv("FMREG_SAM_MODEL", raising=False)
    fixed, moving = _smooth_pair()
    with pytest.raises(FmregError, match="FMREG_SAM_MODEL"):
        get_method("samreg-sam").register(fixed, moving)


def test_sam_masks_of_identical_images_pair_with_themselves(tiny_sam_dir):
    # SamBackend's own thresholds at 0 so the random tiny model yields masks; identical
    # images give identical masks and prototypes, so each ROI pairs with an identical ROI.
    from fmreg.segment.segment_anything import SamBackend

    backend = SamBackend(str(tiny_sam_dir), points_per_side=4, points_per_batch=16,
                         pred_iou_thresh=0.0, stability_score_thresh=0.0, progress=False)
    fixed, _ = _smooth_pair()
    opt = SamRegOptions(min_score=0.0, min_stability=0.0, min_area_frac=0.0, max_area_frac=1.0, max_overlap=1.0)
    fit = FitOptions(image_weight=0.0, verify_dice=None, levels=2, iterations=(10, 5))
    out = samreg(fixed, fixed, backend, backend, opt, fit)
    assert out.pairs, "the tiny model produced no ROI pair"
    for p in out.pairs:
        assert p.similarity == pytest.approx(1.0, abs=1e-5)
        assert torch.equal(p.fixed_mask, p.moving_mask)
    assert out.field.grid == fixed.grid and bool(torch.isfinite(out.field.data).all())
    assert float(jacobian_determinant(out.field).min()) > 0


def test_a_large_image_is_registered_on_a_resampled_copy_and_the_field_comes_back_full_size():
    from fmreg.evaluate.known_transforms import SimilarityParams, known_transform_pair, target_registration_error
    from fmreg.methods.samreg import MAX_WORKING_SIDE
    from fmreg.optimize.pyramid import working_image

    y, x = torch.meshgrid(torch.arange(1400.0), torch.arange(1500.0), indexing="ij")
    blobs = sum(torch.exp(-((x - cx) ** 2 + (y - cy) ** 2) / (2 * r**2)) * v
                for cx, cy, r, v in [(400, 500, 90, 1.0), (1000, 450, 120, 0.6), (700, 950, 150, 0.8), (1150, 1050, 70, 0.4)])
    source = Image(blobs + 0.1 * torch.sin(x / 37) * torch.cos(y / 23), Grid((1400, 1500), (0.5, 0.5)))
    kp = known_transform_pair(source, SimilarityParams(0.0, 1.0, (6.0, -4.0)), crop=0.8)
    small = working_image(kp.fixed, MAX_WORKING_SIDE)
    assert max(small.grid.shape) == MAX_WORKING_SIDE and small.grid.spacing[0] > kp.fixed.grid.spacing[0]
    result = get_method("samreg").register(kp.fixed, kp.moving)
    assert result.field.grid == kp.fixed.grid
    assert result.fit_report["working_shape"]["fixed"] == list(small.grid.shape)
    assert all(p.grids is not None and tuple(p.fixed_mask.shape) == small.grid.shape for p in result.roi_pairs)
    assert target_registration_error(result.field, kp.truth)["mean"] < 1.0


def test_working_image_keeps_the_slices_of_a_stack_and_the_field_of_view():
    from fmreg.optimize.pyramid import working_image

    grid = Grid((5, 900, 700), (0.4, 0.5, 6.0), (10.0, -3.0, 2.0))
    image = Image(torch.rand(5, 900, 700, generator=torch.Generator().manual_seed(0)), grid)
    small = working_image(image, 300, axis=0)
    assert small.grid.shape == (5, 300, 233)  # 1 + round(699 · 299 / 899)
    lo, hi = small.grid.coordinates(Frame.PHYSICAL)[:, 0, 0, 0], small.grid.coordinates(Frame.PHYSICAL)[:, -1, -1, -1]
    assert_close(lo, grid.coordinates(Frame.PHYSICAL)[:, 0, 0, 0])
    assert_close(hi, grid.coordinates(Frame.PHYSICAL)[:, -1, -1, -1])
    assert working_image(image, 900, axis=0) is image


def test_working_image_keeps_a_voxel_budget_on_the_axes_it_may_shrink():
    import math

    from fmreg.optimize.pyramid import working_image

    brain = Image(torch.rand(160, 192, 224), Grid((160, 192, 224), (1.0, 1.0, 1.0)))
    small = working_image(brain, 512, axis=0, max_voxels=1 << 20)
    assert 0.95 * (1 << 20) < math.prod(small.grid.shape) <= 1 << 20
    sp = small.grid.spacing
    assert max(sp) / min(sp) < 1.02 and sp[0] > 1.8  # one factor on every axis
    # A 10 mm stack keeps its slices and shrinks in plane only; under the budget nothing changes.
    stack = Image(torch.rand(7, 416, 512), Grid((7, 416, 512), (1.0, 1.0, 10.0)))
    small = working_image(stack, 512, axis=0, max_voxels=1 << 20)
    assert small.grid.shape[0] == 7 and math.prod(small.grid.shape) <= 1 << 20
    assert small.grid.spacing[0] == pytest.approx(small.grid.spacing[1], rel=0.01)
    acdc = Image(torch.rand(7, 208, 256), Grid((7, 208, 256), (1.5625, 1.5625, 10.0)))
    assert working_image(acdc, 512, axis=0, max_voxels=1 << 20) is acdc
