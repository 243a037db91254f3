"""Issue 12, item 7: roi_pairs.png says which pairs the fit kept, and background regions (cut out
by the image border, or outside the imaged object) do not become ROIs unless asked."""

from __future__ import annotations

import pytest
import torch

from box_masks import box as _box  # tests/ is on sys.path (rootdir-relative import)
from fmreg.app.register import roi_pair_views
from fmreg.core.grid import Grid
from fmreg.core.image import Image
from fmreg.correspond.pairs import RoiPair, SamRegOptions, _object_slices
from fmreg.figures.roi_pairs import REJECTED_COLOUR, RoiPairView, roi_pairs_title, save_roi_pairs
from fmreg.methods.base import RegistrationResult
from fmreg.segment.base import RoiProposals
from fmreg.segment.filtering import (
    MAX_BORDER_OUTLINE,
    background_fraction,
    border_outline_fraction,
    filter_proposals,
)
from fmreg.transforms.displacement import DisplacementField


def _result(n_pairs: int, kept) -> RegistrationResult:
    grid = Grid((32, 32))
    pairs = [RoiPair(_box((32, 32), 4 * i, 4 * i + 3, 5, 9), _box((32, 32), 4 * i, 4 * i + 3, 6, 10), 0.9)
             for i in range(n_pairs)]
    return RegistrationResult(DisplacementField.identity(grid), "samreg", roi_pairs=pairs,
                              fit_report={"kept_pairs": kept})


# ---------------------------------------------------------------------------- kept / rejected
def test_views_mark_the_pairs_the_fit_rejected():
    views = roi_pair_views(_result(3, [1]))
    assert [v.kept for v in views] == [False, True, False]
    assert [v.label for v in views] == [1, 2, 3]
    assert roi_pairs_title(views) == "1 of 3 matched ROI pairs kept by the fit"
    assert views[0].colour == REJECTED_COLOUR and views[1].colour != REJECTED_COLOUR


def test_every_pair_is_kept_without_verification_and_none_after_an_empty_one():
    assert all(v.kept for v in roi_pair_views(_result(2, None)))
    views = roi_pair_views(_result(2, []))
    assert not any(v.kept for v in views)
    assert roi_pairs_title(views) == "0 of 2 matched ROI pairs kept by the fit"
    assert roi_pairs_title([]) == "no ROI pairs"


def test_a_figure_with_rejected_pairs_is_drawn(tmp_path):
    img = Image(torch.rand(32, 32), Grid((32, 32)))
    views = [RoiPairView(_box((32, 32), 2, 9, 2, 9), _box((32, 32), 3, 10, 3, 10), 0.95, 1, kept=False),
             RoiPairView(_box((32, 32), 15, 25, 15, 25), _box((32, 32), 15, 25, 16, 26), 0.91, 2)]
    path = save_roi_pairs(tmp_path / "roi_pairs.png", img, img, views)
    assert path.read_bytes()[:4] == b"\x89PNG"


# ---------------------------------------------------------------------------- border / background
def _props(masks) -> RoiProposals:
    k = len(masks)
    return RoiProposals(torch.stack(masks), torch.ones(k), torch.ones(k))


def test_border_outline_fraction_of_a_strip_an_interior_box_and_a_touching_one():
    strip = _box((64, 64), 56, 64, 0, 64)  # the table: along the whole bottom edge
    interior = _box((64, 64), 20, 30, 20, 30)
    touching = _box((64, 64), 0, 10, 20, 30)  # one short side on the border
    frac = border_outline_fraction(torch.stack([strip, interior, touching]))
    assert frac[0] > MAX_BORDER_OUTLINE and frac[1] == 0
    assert 0 < frac[2] < MAX_BORDER_OUTLINE


def test_filter_drops_border_strips_and_background_unless_asked():
    strip = _box((64, 64), 56, 64, 0, 64)
    interior = _box((64, 64), 20, 30, 20, 30)
    outside = _box((64, 64), 40, 50, 2, 12)  # inside the view, outside the object
    props = _props([strip, interior, outside])
    loose = dict(min_area_frac=0.0, max_area_frac=1.0, min_score=0.0, min_stability=0.0)
    obj = _box((64, 64), 10, 50, 15, 50)
    assert background_fraction(props.masks, obj).tolist() == [1.0, 0.0, 1.0]
    kept = filter_proposals(props, **loose, max_border_outline=MAX_BORDER_OUTLINE, object_mask=obj)
    assert kept.masks.shape[0] == 1 and torch.equal(kept.masks[0], interior)
    assert filter_proposals(props, **loose).masks.shape[0] == 3  # the paper's filter keeps them


def test_keep_border_regions_turns_the_object_rule_off():
    yy, xx = torch.meshgrid(torch.arange(64.0), torch.arange(64.0), indexing="ij")
    body = (((yy - 32) ** 2 + (xx - 32) ** 2) < 20**2).float()  # a disc wholly in view
    image = Image(body * 100 + torch.rand(64, 64), Grid((64, 64)))
    assert _object_slices(image, None, SamRegOptions())[0] is not None
    assert _object_slices(image, None, SamRegOptions(keep_border_regions=True)) == [None]


@pytest.mark.parametrize("keep", [False, True])
def test_samreg_accepts_keep_border_regions(keep):
    from fmreg.methods.base import get_method

    method = get_method("samreg", keep_border_regions=keep)
    assert method.parameters()["roi"]["keep_border_regions"] is keep
