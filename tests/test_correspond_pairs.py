"""ROI pairs of two images (fmreg.correspond.pairs): 2D matching, 3D slice search, labels.

The ROI stage is checked with a fake segmenter and encoder whose masks and features are
known exactly: the segmenter returns one mask per positive integer intensity of a slice,
the encoder maps each intensity to a fixed feature vector, so every prototype and every
similarity is known in advance.
"""

from __future__ import annotations

import math

import pytest
import torch

from fmreg.core.grid import Grid, through_plane_axis
from fmreg.core.image import Image
from fmreg.correspond.labels import label_roi_pairs
from fmreg.correspond.pairs import RoiPair, SamRegOptions, find_roi_pairs
from fmreg.errors import FmregError
from fmreg.segment.base import Encoder, RoiProposals, Segmenter


# Tiny problems: thread start-up and contention cost more than the work (measured 0.15 s
# on one thread vs 0.6-8 s on two for one fit); the fixture lives in conftest.py.
pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ---------------------------------------------------------------------------- fakes
C = 8
#: Intensity value → feature vector. 3 is close to 2 (cosine 0.9) and unrelated to 1;
#: every other value is its own basis vector (cosine 0 with all others).
FEATURES = {v: [1.0 if i == v else 0.0 for i in range(C)] for v in range(C)}
FEATURES[3] = [0.0, 0.0, 0.9, math.sqrt(1 - 0.81), 0.0, 0.0, 0.0, 0.0]


class FakeSegmenter:
    """One mask per positive integer intensity; records the shape of every slice it gets."""

    name = "fake"

    def __init__(self) -> None:
        self.shapes: list[tuple[int, ...]] = []

    def segment(self, image: torch.Tensor) -> RoiProposals:
        self.shapes.append(tuple(image.shape))
        values = [int(v) for v in torch.unique(image.round()).tolist() if v > 0]
        if not values:
            return RoiProposals.empty(tuple(image.shape))
        masks = torch.stack([image.round() == v for v in values])
        return RoiProposals(masks, torch.ones(len(values)), torch.ones(len(values)))


class FakeEncoder:
    """Each pixel's feature is the vector of its intensity value (FEATURES)."""

    name = "fake"

    def features(self, image: torch.Tensor) -> torch.Tensor:
        table = torch.tensor([FEATURES[v] for v in range(C)])  # (values, C)
        idx = image.round().long().clamp(0, C - 1)
        return table[idx].movedim(-1, 0).contiguous()


def _disk(shape, centre_rc, radius) -> torch.Tensor:
    rr, cc = torch.meshgrid(torch.arange(shape[0]), torch.arange(shape[1]), indexing="ij")
    return (rr - centre_rc[0]) ** 2 + (cc - centre_rc[1]) ** 2 <= radius**2


def _paint(shape, shapes) -> torch.Tensor:
    """Float image with value ``v`` in each ``(v, centre_rc, radius)`` disk."""
    img = torch.zeros(shape)
    for v, c, r in shapes:
        img[_disk(shape, c, r)] = float(v)
    return img


LOOSE_AREA = dict(min_area_frac=0.001, max_area_frac=0.5)


def test_fakes_implement_the_protocols():
    assert isinstance(FakeSegmenter(), Segmenter)
    assert isinstance(FakeEncoder(), Encoder)


# ---------------------------------------------------------------------------- 2D matching
SHAPE = (80, 80)
FIXED_2D = [
    (1, (20, 20), 6),  # → moving 1, 3.6 px away: same features → matched
    (2, (20, 60), 6),  # → moving 3 (cosine 0.9 > 0.8): matched
    (4, (60, 20), 6),  # → moving 4, 44.7 px away > 0.2 · 80: too far
    (5, (60, 60), 5),  # → moving 5 with 4× its area > 2.5: too different in size
    (6, (40, 40), 5),  # → moving 7 at the same place: orthogonal features
]
MOVING_2D = [
    (1, (22, 23), 6),
    (3, (21, 60), 6),
    (4, (20, 40), 6),
    (5, (62, 58), 10),
    (7, (41, 41), 5),
]


def _pair_2d(grid: Grid | None = None):
    grid = grid or Grid(SHAPE, (1.0, 1.0))
    return Image(_paint(SHAPE, FIXED_2D), grid), Image(_paint(SHAPE, MOVING_2D), grid)


def _value_pairs(pairs, fixed: Image, moving: Image):
    """(fixed value, moving value) of each pair, read from the images under its masks."""
    out = []
    for p in pairs:
        fv = torch.unique(fixed.data[p.fixed_mask]).tolist()
        mv = torch.unique(moving.data[p.moving_mask]).tolist()
        assert len(fv) == 1 and len(mv) == 1, "a mask covers more than one ROI"
        out.append((int(fv[0]), int(mv[0])))
    return out


def test_matchable_rois_are_paired_and_the_rest_are_not():
    fixed, moving = _pair_2d()
    timings: dict = {}
    pairs = find_roi_pairs(fixed, moving, FakeSegmenter(), FakeEncoder(), SamRegOptions(**LOOSE_AREA), timings)
    # Sorted by similarity, most similar first (the matcher's order).
    assert _value_pairs(pairs, fixed, moving) == [(1, 1), (2, 3)]
    assert [p.similarity for p in pairs] == pytest.approx([1.0, 0.9], abs=1e-6)
    for p, (fv, mv) in zip(pairs, [(1, 1), (2, 3)]):
        assert torch.equal(p.fixed_mask, fixed.data == fv)
        assert torch.equal(p.moving_mask, moving.data == mv)
        assert p.fixed_slice is None and p.moving_slice is None and p.source == "match"
    assert set(timings) == {"segment_embed", "match"}


def test_the_plausibility_gates_are_what_reject_the_far_and_the_resized_roi():
    fixed, moving = _pair_2d()
    seg, enc = FakeSegmenter(), FakeEncoder()
    far = find_roi_pairs(fixed, moving, seg, enc, SamRegOptions(**LOOSE_AREA, max_shift_frac=1.0))
    assert (4, 4) in _value_pairs(far, fixed, moving)
    big = find_roi_pairs(fixed, moving, seg, enc, SamRegOptions(**LOOSE_AREA, max_area_ratio=10.0))
    assert (5, 5) in _value_pairs(big, fixed, moving)
    # Orthogonal features never pair, whatever the gates.
    both = find_roi_pairs(fixed, moving, seg, enc, SamRegOptions(**LOOSE_AREA, max_shift_frac=1.0, max_area_ratio=10.0))
    assert sorted(_value_pairs(both, fixed, moving)) == [(1, 1), (2, 3), (4, 4), (5, 5)]


def test_greedy_matching_takes_the_most_similar_pair_first():
    # Fixed ROIs 2 and 3; moving ROI 2 alone. Fixed 2 ↔ moving 2 (1.0) beats fixed 3 ↔
    # moving 2 (0.9); fixed 3 is then left unmatched (one-to-one).
    fixed = Image(_paint(SHAPE, [(2, (30, 30), 6), (3, (30, 45), 6)]), Grid(SHAPE))
    moving = Image(_paint(SHAPE, [(2, (31, 40), 6)]), Grid(SHAPE))
    pairs = find_roi_pairs(fixed, moving, FakeSegmenter(), FakeEncoder(), SamRegOptions(**LOOSE_AREA))
    assert _value_pairs(pairs, fixed, moving) == [(2, 2)]
    # With "one_to_many" both fixed ROIs take the moving one.
    many = find_roi_pairs(fixed, moving, FakeSegmenter(), FakeEncoder(), SamRegOptions(**LOOSE_AREA, matching="one_to_many"))
    assert sorted(_value_pairs(many, fixed, moving)) == [(2, 2), (3, 2)]


def test_threshold_and_top_k_limit_the_pairs():
    fixed, moving = _pair_2d()
    strict = find_roi_pairs(fixed, moving, FakeSegmenter(), FakeEncoder(), SamRegOptions(**LOOSE_AREA, threshold=0.95))
    assert _value_pairs(strict, fixed, moving) == [(1, 1)]
    top1 = find_roi_pairs(fixed, moving, FakeSegmenter(), FakeEncoder(), SamRegOptions(**LOOSE_AREA, top_k=1))
    assert _value_pairs(top1, fixed, moving) == [(1, 1)]


def test_roi_pair_summary_gives_areas_and_physical_centroids_by_hand():
    # Anisotropic grid with an origin: x spacing 0.5 mm, y spacing 2 mm.
    fixed_grid = Grid((40, 60), (0.5, 2.0), (10.0, -20.0))
    moving_grid = Grid((30, 30), (1.0, 1.0), (-5.0, 7.0))
    fm = torch.zeros(fixed_grid.shape, dtype=torch.bool)
    fm[4:8, 10:20] = True  # rows 4..7, columns 10..19: 40 px, centroid (row 5.5, col 14.5)
    mm = torch.zeros(moving_grid.shape, dtype=torch.bool)
    mm[0:3, 2:4] = True  # 6 px, centroid (row 1, col 2.5)
    s = RoiPair(fm, mm, 0.87654321, 3, 4).summary(fixed_grid, moving_grid)
    assert s["fixed_area_voxels"] == 40 and s["moving_area_voxels"] == 6
    assert s["fixed_centroid_mm"] == pytest.approx([10.0 + 0.5 * 14.5, -20.0 + 2.0 * 5.5])  # 17.25, -9
    assert s["moving_centroid_mm"] == pytest.approx([-5.0 + 2.5, 7.0 + 1.0])
    assert s["similarity"] == 0.8765
    assert (s["fixed_slice"], s["moving_slice"], s["source"]) == (3, 4, "match")
    import json

    assert json.loads(json.dumps(s)) == s


def test_roi_pair_summary_gives_physical_areas():
    grid = Grid((40, 60), (0.5, 2.0), (10.0, -20.0))
    m = torch.zeros(grid.shape, dtype=torch.bool)
    m[4:8, 10:20] = True
    s = RoiPair(m, m, 1.0).summary(grid, grid)
    physical = {k: v for k, v in s.items() if "area" in k and "mm" in k}
    assert sorted(physical.values()) == pytest.approx([40.0, 40.0])  # 40 px × 1 mm²


# ---------------------------------------------------------------------------- 3D slice search
def _stack(shape, spacing, axis, rois) -> Image:
    """3D image with the 2D ``(value, centre_rc, radius)`` disks of ``rois[index]`` painted on
    slice ``index`` along array ``axis``."""
    data = torch.zeros(shape)
    plane = [n for a, n in enumerate(shape) if a != axis]
    for index, disks in rois.items():
        data.select(axis, index).copy_(_paint(plane, disks))
    return Image(data, Grid(shape, spacing))


@pytest.mark.parametrize("slice_range,expected", [(1, [(3, 4)]), (2, [(3, 4)]), (0, [])])
def test_slices_within_slice_range_are_searched(slice_range, expected):
    shape, spacing = (6, 40, 40), (1.0, 1.0, 5.0)
    fixed = _stack(shape, spacing, 0, {3: [(1, (20, 20), 6)]})
    moving = _stack(shape, spacing, 0, {4: [(1, (21, 22), 6)]})
    seg = FakeSegmenter()
    pairs = find_roi_pairs(fixed, moving, seg, FakeEncoder(), SamRegOptions(**LOOSE_AREA, slice_range=slice_range))
    assert [(p.fixed_slice, p.moving_slice) for p in pairs] == expected
    assert seg.shapes == [(40, 40)] * 12  # 6 fixed + 6 moving slices
    for p in pairs:
        # Lifted back to 3D: single-slice masks on the full grids.
        assert p.fixed_mask.shape == shape and p.moving_mask.shape == shape
        assert torch.equal(p.fixed_mask, fixed.data == 1)
        assert torch.equal(p.moving_mask, moving.data == 1)
        assert p.fixed_mask[3].any() and not p.fixed_mask[torch.arange(6) != 3].any()


@pytest.mark.parametrize(
    "shape,spacing,axis",
    [
        ((5, 30, 32), (1.0, 1.0, 6.0), 0),  # spacing x, y, z: z (array axis 0) is coarsest
        ((30, 32, 5), (6.0, 1.0, 1.0), 2),  # x (array axis 2) is coarsest
        ((20, 4, 24), (1.0, 7.0, 1.2), 1),  # y (array axis 1) is coarsest
    ],
)
def test_slices_are_cut_along_the_coarsest_spacing_axis(shape, spacing, axis):
    assert through_plane_axis(Grid(shape, spacing)) == axis
    plane = tuple(n for a, n in enumerate(shape) if a != axis)
    fixed = _stack(shape, spacing, axis, {2: [(1, (10, 12), 5)]})
    moving = _stack(shape, spacing, axis, {2: [(1, (11, 12), 5)]})
    seg = FakeSegmenter()
    pairs = find_roi_pairs(fixed, moving, seg, FakeEncoder(), SamRegOptions(**LOOSE_AREA, slice_range=0))
    assert seg.shapes == [plane] * (2 * shape[axis])
    assert len(pairs) == 1 and (pairs[0].fixed_slice, pairs[0].moving_slice) == (2, 2)
    assert torch.equal(pairs[0].fixed_mask, fixed.data == 1)
    assert torch.equal(pairs[0].moving_mask, moving.data == 1)


# ---------------------------------------------------------------------------- label pairs
def test_label_roi_pairs_gives_one_pair_per_shared_non_zero_value():
    grid = Grid((10, 12))
    fixed = torch.zeros(grid.shape, dtype=torch.int64)
    moving = torch.zeros(grid.shape, dtype=torch.int64)
    fixed[1:3, 1:3], fixed[5:7, 5:7], fixed[8:9, 8:10] = 1, 2, 3
    moving[1:4, 1:3], moving[5:8, 6:8], moving[0, 0] = 2, 3, 4
    pairs = label_roi_pairs(Image(fixed, grid), Image(moving, grid))
    assert [p.source for p in pairs] == ["labels:2", "labels:3"]
    for p, v in zip(pairs, (2, 3)):
        assert torch.equal(p.fixed_mask, fixed == v) and torch.equal(p.moving_mask, moving == v)
        assert p.similarity == 1.0 and p.fixed_slice is None
    only = label_roi_pairs(Image(fixed, grid), Image(moving, grid), values=[3])
    assert [p.source for p in only] == ["labels:3"]


def test_label_roi_pairs_without_a_shared_value_is_a_user_error():
    grid = Grid((6, 6))
    fixed = torch.zeros(grid.shape, dtype=torch.int64)
    moving = torch.zeros(grid.shape, dtype=torch.int64)
    fixed[1, 1], moving[2, 2] = 1, 2
    with pytest.raises(FmregError, match="share no non-zero label"):
        label_roi_pairs(Image(fixed, grid), Image(moving, grid))
    with pytest.raises(FmregError, match="share no non-zero label"):
        label_roi_pairs(Image(torch.zeros_like(fixed), grid), Image(torch.zeros_like(moving), grid))
