"""Analytic checks of the outlier-removing ROI filter (paper 002, Sec. 3.2.2 and 4.2)."""

import pytest
import torch
from torch.testing import assert_close

from box_masks import box as _box  # tests/ is on sys.path (rootdir-relative import)
from fmreg.errors import FmregError
from fmreg.segment.base import RoiProposals
from fmreg.segment.filtering import (
    MAX_AREA_FRAC,
    MAX_OVERLAP,
    MIN_AREA_FRAC,
    MIN_SCORE,
    MIN_STABILITY,
    filter_proposals,
    overlap_ratio,
)


def _props(masks, scores, stability=None):
    masks = torch.stack(masks)
    scores = torch.tensor(scores, dtype=torch.float32)
    stability = torch.ones(len(scores)) if stability is None else torch.tensor(stability)
    return RoiProposals(masks, scores, stability.float())


# --------------------------------------------------------------------------- filtering


def test_paper_defaults():
    # Paper 002, Sec. 4.2: 200-7000 px on 200x200 images, overlap 0.8, SAM thresholds 0.90.
    assert MIN_AREA_FRAC * 200 * 200 == pytest.approx(200)
    assert MAX_AREA_FRAC * 200 * 200 == pytest.approx(7000)
    assert MAX_OVERLAP == 0.8
    assert MIN_SCORE == 0.9 and MIN_STABILITY == 0.9


def test_area_bounds_are_inclusive_and_empty_masks_go():
    shape = (20, 20)  # 400 px; bounds 10 and 100 px
    masks = [
        torch.zeros(shape, dtype=torch.bool),  # empty
        _box(shape, 0, 3, 0, 3),  # 9 px: too small
        _box(shape, 0, 2, 5, 10),  # 10 px: exactly the minimum
        _box(shape, 10, 20, 0, 10),  # 100 px: exactly the maximum
        _box(shape, 0, 11, 10, 20),  # 110 px: too large
    ]
    out = filter_proposals(
        _props(masks, [1.0] * 5),
        min_area_frac=10 / 400,
        max_area_frac=100 / 400,
        min_score=0,
        min_stability=0,
    )
    assert len(out) == 2
    assert torch.equal(out.masks, torch.stack([masks[2], masks[3]]))


def test_score_and_stability_thresholds():
    shape = (20, 20)
    masks = [_box(shape, 0, 5, 0, 5), _box(shape, 0, 5, 10, 15), _box(shape, 10, 15, 0, 5)]
    props = _props(masks, [0.95, 0.85, 0.95], [0.95, 0.95, 0.85])
    out = filter_proposals(props, min_area_frac=0, max_area_frac=1)  # paper's 0.90 / 0.90
    assert_close(out.scores, torch.tensor([0.95]))
    assert_close(out.stability, torch.tensor([0.95]))
    out = filter_proposals(
        props, min_area_frac=0, max_area_frac=1, min_score=0.85, min_stability=0.85
    )
    assert len(out) == 3


def test_overlap_keeps_the_higher_score_and_uses_the_smaller_area():
    shape = (20, 20)
    big = _box(shape, 0, 10, 0, 10)  # 100 px
    inside = _box(shape, 0, 5, 0, 5)  # 25 px inside big: overlap 25 / 25 = 1
    assert_close(overlap_ratio(torch.stack([big, inside])), torch.ones(2, 2, dtype=torch.float64))
    kw = dict(min_area_frac=0, max_area_frac=1, min_score=0, min_stability=0)
    out = filter_proposals(_props([big, inside], [0.5, 0.9]), **kw)
    assert torch.equal(out.masks, inside[None])
    out = filter_proposals(_props([big, inside], [0.9, 0.5]), **kw)
    assert torch.equal(out.masks, big[None])


def test_overlap_threshold_is_exclusive():
    shape = (20, 20)
    a = _box(shape, 0, 10, 0, 10)  # 100 px
    b = _box(shape, 0, 10, 2, 12)  # 100 px, 80 shared: ratio 0.8, kept
    c = _box(shape, 0, 10, 1, 11)  # 100 px, 90 shared with a: ratio 0.9, dropped
    kw = dict(min_area_frac=0, max_area_frac=1, min_score=0, min_stability=0)
    assert len(filter_proposals(_props([a, b], [0.9, 0.8]), **kw)) == 2
    out = filter_proposals(_props([a, c], [0.9, 0.8]), **kw)
    assert torch.equal(out.masks, a[None])


def test_overlap_suppression_is_greedy_by_score_and_keeps_original_order():
    shape = (20, 20)
    a = _box(shape, 0, 10, 0, 10)  # score 0.9
    b = _box(shape, 0, 10, 1, 11)  # score 0.8: 0.9 overlap with a -> dropped
    c = _box(shape, 0, 10, 2, 12)  # score 0.7: 0.8 with a (kept), 0.9 with b (already gone)
    d = _box(shape, 15, 20, 15, 20)  # score 0.95, disjoint
    kw = dict(min_area_frac=0, max_area_frac=1, min_score=0, min_stability=0)
    out = filter_proposals(_props([a, b, c, d], [0.9, 0.8, 0.7, 0.95]), **kw)
    assert torch.equal(out.masks, torch.stack([a, c, d]))
    assert_close(out.scores, torch.tensor([0.9, 0.7, 0.95]))


def test_filter_handles_no_candidates_and_bad_input():
    empty = RoiProposals.empty((8, 8))
    assert len(filter_proposals(empty)) == 0
    with pytest.raises(FmregError):
        flat = torch.zeros(8, 8, dtype=torch.bool)
        filter_proposals(RoiProposals(flat, torch.zeros(1), torch.zeros(1)))
    with pytest.raises(FmregError):
        filter_proposals(empty, min_area_frac=0.5, max_area_frac=0.1)


def test_overlap_cache_serves_subsets_of_its_largest_request_exactly():
    from fmreg.segment.filtering import OverlapCache, overlap_ratio

    g = torch.Generator().manual_seed(0)
    masks = torch.rand((6, 12, 12), generator=g) > 0.6
    cache = OverlapCache(masks)
    big = torch.tensor([0, 2, 3, 5])
    assert torch.equal(cache(big), overlap_ratio(masks[big]))
    sub = torch.tensor([5, 2])
    assert torch.equal(cache(sub), overlap_ratio(masks[sub]))
    assert torch.equal(cache.index, big)  # served from the cache
    other = torch.tensor([1, 4])
    assert torch.equal(cache(other), overlap_ratio(masks[other]))
