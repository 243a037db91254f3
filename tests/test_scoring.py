"""Scoring a registered pair: every label at once, the default label policy, the metrics record."""

from __future__ import annotations

import math

import pytest
import torch

from fmreg.core.image import Image
from fmreg.core.grid import Grid
from fmreg.errors import FmregError
from fmreg.evaluate.metrics import average_surface_distance, hd95
from fmreg.io.manifest import binarize_fg
from fmreg.evaluate.scoring import LabelScores, default_label_spec, evaluate_labels, parse_label_spec, score
from fmreg.io.manifest import LabelSpec
from fmreg.transforms.displacement import DisplacementField
from test_metrics import ANISO, NAN, _close, _two_squares


# ------------------------------------------------------------------------------ every label
def test_evaluate_labels_matches_individual_metrics():
    grid = Grid((8, 8), spacing=(0.5, 2.0))
    pred, target = _two_squares()
    with pytest.warns(RuntimeWarning) as record:
        scores = evaluate_labels(pred, target, grid, [1, 2, 3])
    messages = [str(w.message) for w in record]
    assert any("label 2 is absent from the warped moving and fixed labels" in m
               for m in messages)
    assert any("label 3 is absent from the fixed labels" in m for m in messages)
    assert isinstance(scores, LabelScores)
    assert scores.label_values == (1, 2, 3)
    _close(scores.dice[1], 0.5)
    _close(scores.hd95[1], hd95(pred == 1, target == 1, grid))
    _close(scores.asd[1], average_surface_distance(pred == 1, target == 1, grid))
    # The squares' centroids are 2 columns apart at x spacing 0.5.
    _close(scores.centroid_tre[1], 1.0)
    _close([scores.dice[2], scores.hd95[2], scores.asd[2], scores.centroid_tre[2]], [NAN] * 4)
    _close([scores.dice[3], scores.hd95[3]], [0.0, NAN])
    # Means skip NaN.
    _close(scores.mean_dice, 0.25)
    _close(scores.mean_hd95, scores.hd95[1])
    _close(scores.mean_centroid_tre, 1.0)
    d = scores.to_dict()
    assert d["dice"]["1"] == 0.5 and d["mean_dice"] == 0.25


def test_label_scores_mean_all_nan_is_nan():
    scores = LabelScores(dice={1: NAN}, hd95={1: NAN}, asd={}, centroid_tre={1: NAN})
    assert math.isnan(scores.mean_dice)
    assert math.isnan(scores.mean_asd)


def test_evaluate_labels_fg_workflow_and_3d():
    raw_fixed = torch.zeros(ANISO.shape, dtype=torch.uint8)
    raw_fixed[2:6, 2:6, 2:6] = 200
    raw_moving = torch.zeros_like(raw_fixed)
    raw_moving[4:8, 2:6, 2:6] = 255
    raw_moving[0, 0, 0] = 100  # anti-aliasing fringe below the threshold
    scores = evaluate_labels(binarize_fg(raw_moving), binarize_fg(raw_fixed), ANISO, [1])
    _close(scores.dice[1], 0.5)
    _close(scores.hd95[1], 20.0)
    _close(scores.asd[1], 444 / 56)
    _close(scores.centroid_tre[1], 20.0)
    with pytest.raises(FmregError, match="binarize"):
        evaluate_labels(raw_moving, raw_fixed, ANISO, "fg")


# ------------------------------------------------------------------------------ label policy
def test_default_label_spec_fg_for_rendered_masks_else_nonzero_values():
    grid = Grid((4, 4))
    mask = torch.zeros(4, 4, dtype=torch.int64)
    mask[1:3, 1:3] = 255
    assert default_label_spec(Image(mask, grid)) == LabelSpec(fg=True)
    mask[0, 0] = 7
    assert default_label_spec(Image(mask.clamp(max=7), grid)) == LabelSpec(values=(7,))


def test_parse_label_spec():
    assert parse_label_spec(None) is None
    assert parse_label_spec("1,2 3") == LabelSpec(values=(1, 2, 3))
    spec = LabelSpec(fg=True)
    assert parse_label_spec(spec) is spec
    with pytest.raises(FmregError, match="empty"):
        parse_label_spec(" ")


def test_score_reports_labels_and_regularity_and_logs_nan_warnings():
    grid = Grid((8, 8), spacing=(0.5, 2.0))
    pred, target = _two_squares()
    lines = []
    mets = score(Image(pred, grid), Image(target, grid), LabelSpec(values=(1, 2)),
                 DisplacementField.identity(grid), log=lines.append)
    assert mets["labels"] == [1, 2] and mets["dice"]["1"] == 0.5 and math.isnan(mets["dice"]["2"])
    assert mets["folding_pct"] == 0.0 and mets["std_log_jacobian"] == 0.0
    assert lines == ["warning: label 2 is absent from the warped moving and fixed labels: its undefined scores are NaN"]
