"""Analytic checks of ROI prototypes, similarity and matching (paper 002, Eq. 5-9)."""

import math

import pytest
import torch
from torch.testing import assert_close

from box_masks import box as _box  # tests/ is on sys.path (rootdir-relative import)
from fmreg.correspond.matching import Match, match_rois, similarity_matrix
from fmreg.correspond.prototypes import resize_masks, roi_prototypes
from fmreg.errors import FmregError


# --------------------------------------------------------------------------- prototypes


def test_prototypes_are_masked_means_on_the_feature_grid():
    feats = torch.arange(2 * 4 * 4, dtype=torch.float32).reshape(2, 4, 4)
    m0 = _box((4, 4), 0, 2, 0, 2)  # cells (0,0) (0,1) (1,0) (1,1): values 0 1 4 5
    m1 = _box((4, 4), 3, 4, 0, 4)  # last row: 12 13 14 15
    p = roi_prototypes(feats, torch.stack([m0, m1]))
    assert_close(p, torch.tensor([[2.5, 18.5], [13.5, 29.5]]))


def test_prototypes_pool_finer_masks_by_area():
    feats = torch.arange(2 * 4 * 4, dtype=torch.float32).reshape(2, 4, 4)
    # 8x8 masks on the 4x4 feature grid: each feature cell covers a 2x2 pixel block.
    whole_cell = _box((8, 8), 0, 2, 0, 2)  # exactly cell (0, 0)
    one_pixel = _box((8, 8), 5, 6, 2, 3)  # a quarter of cell (2, 1): weight 0.25, alone
    straddle = _box((8, 8), 0, 2, 1, 3)  # half of cell (0, 0) and half of cell (0, 1)
    masks = torch.stack([whole_cell, one_pixel, straddle])
    assert_close(resize_masks(masks, (4, 4))[1, 2, 1], torch.tensor(0.25))
    p = roi_prototypes(feats, masks)
    assert_close(p, torch.tensor([[0.0, 16.0], [9.0, 25.0], [0.5, 16.5]]))


def test_prototypes_reject_empty_masks_and_accept_none():
    feats = torch.rand(3, 4, 4)
    masks = torch.stack([_box((4, 4), 0, 1, 0, 1), torch.zeros(4, 4, dtype=torch.bool)])
    with pytest.raises(FmregError, match=r"\[1\]"):
        roi_prototypes(feats, masks)
    assert roi_prototypes(feats, torch.zeros(0, 4, 4, dtype=torch.bool)).shape == (0, 3)


# --------------------------------------------------------------------------- similarity


def test_similarity_values_and_mappings():
    pm = torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 0.0]])
    pf = torch.tensor([[2.0, 0.0], [0.0, 3.0], [-1.0, 0.0], [1.0, -1.0]])
    r = 1 / math.sqrt(2)
    cos = torch.tensor([[1.0, 0.0, -1.0, r], [r, r, -r, 0.0], [0.0, 0.0, 0.0, 0.0]])
    assert_close(similarity_matrix(pm, pf), cos.clamp_min(0))
    assert_close(similarity_matrix(pm, pf, mapping="affine"), (cos + 1) / 2)
    assert_close(similarity_matrix(pm, pf, mapping="abs"), cos.abs())
    with pytest.raises(FmregError):
        similarity_matrix(pm, pf, mapping="dot")
    with pytest.raises(FmregError):
        similarity_matrix(pm, torch.zeros(2, 3))


# --------------------------------------------------------------------------- matching


def test_greedy_and_optimal_differ_as_hand_computed():
    s = torch.tensor([[0.90, 0.85], [0.85, 0.10]])
    # Greedy takes 0.90 first; what is left (0.10) is below the threshold.
    assert match_rois(s, mode="greedy") == [Match(0, 0, pytest.approx(0.90))]
    # The optimal one-to-one assignment takes both 0.85 pairs (total 1.70 > 0.90).
    assert match_rois(s, mode="optimal") == [
        Match(0, 1, pytest.approx(0.85)),
        Match(1, 0, pytest.approx(0.85)),
    ]


def test_optimal_never_trades_a_valid_pair_for_a_sub_threshold_one():
    # Plain maximum-sum assignment would take 0.5 + 0.5 = 1.0 > 0.95 + 0.0; only pairs above
    # the threshold are worth anything, so the valid 0.95 pair must win.
    s = torch.tensor([[0.95, 0.5], [0.5, 0.0]])
    assert match_rois(s, mode="optimal") == [Match(0, 0, pytest.approx(0.95))]


def test_greedy_paper_rule_on_a_3x3_matrix():
    s = torch.tensor([[0.81, 0.95, 0.30], [0.90, 0.92, 0.20], [0.10, 0.85, 0.82]])
    # 0.95 at (0, 1); then among rows 1, 2 and columns 0, 2: 0.90 at (1, 0); then 0.82 at (2, 2).
    got = match_rois(s)
    assert [(m.moving_index, m.fixed_index) for m in got] == [(0, 1), (1, 0), (2, 2)]
    assert_close(torch.tensor([m.similarity for m in got]), torch.tensor([0.95, 0.90, 0.82]))


def test_threshold_is_strict_and_top_k_keeps_the_best():
    s = torch.tensor([[0.80, 0.0, 0.0], [0.0, 0.9, 0.0], [0.0, 0.0, 0.85]])
    got = match_rois(s, threshold=0.8)
    assert [(m.moving_index, m.fixed_index) for m in got] == [(1, 1), (2, 2)]
    assert [(m.moving_index, m.fixed_index) for m in match_rois(s, threshold=0.7)] == [
        (1, 1),
        (2, 2),
        (0, 0),
    ]
    for mode in ("greedy", "optimal", "one_to_many"):
        top = match_rois(s, threshold=0.7, mode=mode, top_k=2)
        assert [(m.moving_index, m.fixed_index) for m in top] == [(1, 1), (2, 2)]
    assert match_rois(s, top_k=0) == []


def test_one_to_many_is_the_union_of_row_and_column_best():
    s = torch.tensor([[0.90, 0.85, 0.10], [0.95, 0.20, 0.30], [0.10, 0.10, 0.50]])
    # Rows: 0 -> 0 (0.90), 1 -> 0 (0.95), 2 -> 2 (0.50, too low).
    # Columns: 0 <- 1 (0.95), 1 <- 0 (0.85), 2 <- 2 (0.50, too low).
    got = match_rois(s, mode="one_to_many")
    assert [(m.moving_index, m.fixed_index) for m in got] == [(1, 0), (0, 0), (0, 1)]
    # One-to-one matching of the same matrix uses every ROI at most once.
    assert [(m.moving_index, m.fixed_index) for m in match_rois(s)] == [(1, 0), (0, 1)]


def test_ties_break_towards_lower_indices():
    s = torch.full((2, 3), 0.9)
    assert [(m.moving_index, m.fixed_index) for m in match_rois(s)] == [(0, 0), (1, 1)]
    # Every row's best is column 0, every column's best is row 0.
    assert [(m.moving_index, m.fixed_index) for m in match_rois(s, mode="one_to_many")] == [
        (0, 0),
        (0, 1),
        (0, 2),
        (1, 0),
    ]


def test_matching_edge_cases():
    assert match_rois(torch.zeros(0, 3)) == []
    assert match_rois(torch.zeros(2, 0), mode="optimal") == []
    with pytest.raises(FmregError):
        match_rois(torch.zeros(2, 2), mode="best")
    with pytest.raises(FmregError):
        match_rois(torch.zeros(2))
    with pytest.raises(FmregError):
        match_rois(torch.tensor([[float("nan")]]))
    m = Match(0, 1, 0.9)
    with pytest.raises(AttributeError):
        m.similarity = 1.0  # frozen
