"""Pictures: they are written atomically, open, have a sensible size, show something, and
draw slices the right way up at the right physical aspect."""

import math

import numpy as np
import pytest
import torch
from PIL import Image as PILImage

from fmreg.errors import FmregError
from fmreg.transforms.displacement import DisplacementField, jacobian_determinant
from fmreg.transforms.warp import warp, warp_labels
from fmreg.core.grid import Grid
from fmreg.core.image import Image
from fmreg.phantoms import make_pair
from fmreg.figures import jacobian, layout, roi_pairs
from fmreg.figures import (
    FOLD_COLOUR,
    NAN_COLOUR,
    NEUTRAL_COLOUR,
    RoiPairView,
    jacobian_colours,
    save_jacobian_map,
    save_label_overlay,
    save_overview,
    save_roi_pairs,
)


def _acdc_like_pair():
    """A small stack shaped like ACDC: few 10 mm slices of fine in-plane pixels."""
    grid = Grid((7, 64, 52), (1.5625, 1.5625, 10.0), (-40.0, 12.0, 100.0))
    z, y, x = torch.meshgrid(*[torch.arange(s, dtype=torch.float32) for s in grid.shape], indexing="ij")
    blob = (((x - 26) / 18) ** 2 + ((y - 32) / 24) ** 2 + ((z - 3) / 4) ** 2 < 1).float()
    fixed = Image(blob + 0.3 * torch.sin(x / 3), grid, "fixed")
    moving = Image(torch.roll(fixed.data, 2, dims=2), grid, "moving")
    u = torch.zeros((3, *grid.shape))
    u[0] = 3.0 * torch.exp(-((x - 26) ** 2 + (y - 32) ** 2) / 200.0)
    return fixed, moving, DisplacementField(u, grid)


@pytest.fixture(scope="module", params=["2d", "3d", "acdc"])
def case(request):
    if request.param == "acdc":
        fixed, moving, field = _acdc_like_pair()
        labels = Image((fixed.data > 0.6).long(), fixed.grid)
        return fixed, moving, field, labels, labels
    p = make_pair(2 if request.param == "2d" else 3)
    return p.fixed, p.moving, p.true_field, p.fixed_labels, p.moving_labels


def _open(path) -> np.ndarray:
    with PILImage.open(path) as im:
        assert im.format == "PNG"
        return np.asarray(im.convert("RGB"))


def _check_picture(path, min_width=500, min_height=150):
    arr = _open(path)
    h, w = arr.shape[:2]
    assert min_width <= w <= 4000 and min_height <= h <= 4000, (w, h)
    assert float(arr.std()) > 20.0  # not blank
    assert not list(path.parent.glob(".fmreg-tmp-*"))
    return arr


def _roi_pairs(fixed_labels: Image, moving_labels: Image) -> list[RoiPairView]:
    values = [int(v) for v in torch.unique(fixed_labels.data) if v != 0]
    return [
        RoiPairView(fixed_labels.data == v, moving_labels.data == v, 0.9 - 0.1 * i, i + 1)
        for i, v in enumerate(values)
    ]


# ---------------------------------------------------------------------------- figures
def test_overview(case, tmp_path):
    fixed, moving, field, _, _ = case
    out = save_overview(tmp_path / "overview.png", fixed, moving, warp(moving, field), field, title="test")
    arr = _check_picture(out, min_width=800)
    assert out == tmp_path / "overview.png"
    if fixed.ndim == 3:
        assert arr.shape[0] > 500  # one row per view


def test_overview_accepts_a_precomputed_jacobian(tmp_path):
    fixed, moving, field = _acdc_like_pair()
    jac = jacobian_determinant(field)
    _check_picture(save_overview(tmp_path / "o.png", fixed, moving, warp(moving, field), field, jac))
    with pytest.raises(FmregError):
        save_overview(tmp_path / "bad.png", fixed, moving, warp(moving, field), field, jac[:3])
    assert not (tmp_path / "bad.png").exists()


def test_overview_rejects_a_field_on_another_grid(tmp_path):
    fixed, moving, field = _acdc_like_pair()
    other = DisplacementField.identity(Grid((7, 64, 52), (1.0, 1.0, 10.0)))
    with pytest.raises(FmregError, match="fixed grid"):
        save_overview(tmp_path / "o.png", fixed, moving, warp(moving, field), other)


def test_roi_pairs(case, tmp_path):
    fixed, moving, _, fixed_labels, moving_labels = case
    pairs = _roi_pairs(fixed_labels, moving_labels)
    assert pairs
    _check_picture(save_roi_pairs(tmp_path / "pairs.png", fixed, moving, pairs), min_width=700)


def test_zero_roi_pairs(case, tmp_path):
    fixed, moving = case[0], case[1]
    _check_picture(save_roi_pairs(tmp_path / "none.png", fixed, moving, []), min_width=700)


def test_roi_pairs_on_different_slices_in_fixed_and_moving(tmp_path):
    fixed, moving, _ = _acdc_like_pair()
    fm = torch.zeros(fixed.grid.shape, dtype=torch.bool)
    mm = torch.zeros(moving.grid.shape, dtype=torch.bool)
    fm[1, 20:30, 20:30] = True
    mm[5, 25:35, 15:25] = True
    pairs = [RoiPairView(fm, mm, 0.7, 1)]
    _check_picture(save_roi_pairs(tmp_path / "p.png", fixed, moving, pairs), min_width=700)
    # The slice chooser follows the masks, not the middle of the stack.
    assert [v.index for v in layout.choose_views(fixed.grid, [fm.numpy()])] == [1]
    assert [v.index for v in layout.choose_views(moving.grid, [mm.numpy()])] == [5]
    # A second pair on fixed slice 1 whose moving mask is on moving slice 1: two rows with the
    # same fixed slice, each beside the moving slice of its own pair.
    mm2 = torch.zeros(moving.grid.shape, dtype=torch.bool)
    mm2[1, 5:12, 5:12] = True
    fm2 = torch.zeros(fixed.grid.shape, dtype=torch.bool)
    fm2[1, 5:12, 5:12] = True
    plan = roi_pairs.plan_rows(fixed.grid, moving.grid, [fm.numpy(), fm2.numpy()], [mm.numpy(), mm2.numpy()])
    assert sorted((f.index, m.index, idx) for f, m, idx in plan) == [(1, 1, [1]), (1, 5, [0])]
    # No pairs: one row, both images at the middle slice.
    (f, m, idx), = roi_pairs.plan_rows(fixed.grid, moving.grid, [], [])
    assert (f.index, m.index, idx) == (3, 3, [])


def test_roi_pair_masks_must_match_their_grids(tmp_path):
    fixed, moving, _ = _acdc_like_pair()
    bad = RoiPairView(torch.zeros((7, 64, 51), dtype=torch.bool), torch.zeros(moving.grid.shape, dtype=torch.bool), 0.5, 1)
    with pytest.raises(FmregError, match="ROI pair 1"):
        save_roi_pairs(tmp_path / "p.png", fixed, moving, [bad])


def test_label_overlay(case, tmp_path):
    fixed, _, field, fixed_labels, moving_labels = case
    warped = warp_labels(moving_labels, field)
    _check_picture(save_label_overlay(tmp_path / "labels.png", fixed, fixed_labels, warped), min_width=800)


def test_label_overlay_rejects_labels_on_another_grid(tmp_path):
    fixed, _, _ = _acdc_like_pair()
    labels = Image(torch.zeros((7, 64, 52), dtype=torch.int64), Grid((7, 64, 52), (2.0, 2.0, 10.0)))
    with pytest.raises(FmregError):
        save_label_overlay(tmp_path / "l.png", fixed, labels, labels)


def test_jacobian_map(case, tmp_path):
    field = case[2]
    _check_picture(save_jacobian_map(tmp_path / "jac.png", jacobian_determinant(field), field.grid), min_width=800)
    with pytest.raises(FmregError):
        save_jacobian_map(tmp_path / "bad.png", torch.ones(3, 3), field.grid)


# ---------------------------------------------------------------------------- colours
def test_jacobian_colour_map_fixed_points():
    j = torch.tensor([1.0, 0.0, -3.0, float("nan"), 2.0, 0.5, 100.0, 1e-6])
    rgb = jacobian_colours(j, limit=2.0)
    assert rgb.dtype == np.uint8 and rgb.shape == (8, 3)
    assert tuple(rgb[0]) == NEUTRAL_COLOUR
    assert tuple(rgb[1]) == FOLD_COLOUR
    assert tuple(rgb[2]) == FOLD_COLOUR
    assert tuple(rgb[3]) == NAN_COLOUR
    # Growth is red, shrinkage blue, equally strong for J and 1/J (log-symmetric scale).
    grow, shrink = rgb[4].astype(int), rgb[5].astype(int)
    assert grow[0] > grow[2] and shrink[2] > shrink[0]
    assert np.abs(255 - grow).sum() == pytest.approx(np.abs(255 - shrink).sum(), rel=0.25)
    # Saturates beyond the limit, and tiny positive values are shrinkage, not folding.
    assert tuple(rgb[6]) == tuple(rgb[4])
    assert tuple(rgb[7]) == tuple(rgb[5]) and tuple(rgb[7]) != FOLD_COLOUR
    # The folding colour is never produced by an unfolded value.
    ramp = jacobian_colours(np.exp(np.linspace(-5, 5, 2001)), limit=3.0)
    assert not (ramp == np.asarray(FOLD_COLOUR, np.uint8)).all(axis=1).any()


def test_jacobian_colour_map_rejects_a_bad_limit():
    with pytest.raises(FmregError):
        jacobian_colours(np.ones(3), limit=1.0)


def test_folding_shows_in_the_jacobian_map(tmp_path):
    grid = Grid((40, 40))
    jac = torch.ones(grid.shape)
    jac[10:20, 10:20] = -0.5
    arr = _open(save_jacobian_map(tmp_path / "j.png", jac, grid))
    fold = (arr == np.asarray(FOLD_COLOUR, np.uint8)).all(axis=-1)
    # The folded square plus the legend swatch; 1/16 of the map is folded.
    assert fold.sum() > 0.04 * 800 * 800


# ---------------------------------------------------------------------------- geometry of drawing
def _colour_centres(arr: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean (row, col) of the strongly red and strongly blue pixels of a picture."""
    r, g, b = (arr[..., k].astype(int) for k in range(3))
    red = (r > 150) & (g < 90) & (b < 90)
    blue = (b > 150) & (r < 90) & (g < 120)
    return np.argwhere(red).mean(axis=0), np.argwhere(blue).mean(axis=0)


def test_2d_pictures_keep_row_zero_at_the_top_and_column_zero_at_the_left(tmp_path):
    grid = Grid((30, 40))
    jac = torch.full(grid.shape, 0.25)
    jac[:10, :15] = 4.0  # top-left corner grows (red); the rest shrinks (blue)
    red, blue = _colour_centres(_open(save_jacobian_map(tmp_path / "j.png", jac, grid)))
    assert red[0] < blue[0] and red[1] < blue[1]


def test_3d_edge_on_views_keep_slice_zero_at_the_top(tmp_path):
    grid = Grid((6, 30, 30), (1.0, 1.0, 8.0))
    jac = torch.full(grid.shape, 0.25)
    jac[:2] = 4.0  # first slices grow
    views = layout.choose_views(grid)
    assert [v.axis for v in views] == [0, 1, 2]  # slice axis first, then the edge-on views
    # Draw the edge-on view alone: slice 0 is the top row.
    panel = jacobian.jacobian_panel(views[1].take(jac.numpy()), layout.screen_size(views[1], 0.25), 4.0, "")
    red, blue = _colour_centres(panel)
    assert red[0] < blue[0]


def test_views_follow_the_coarsest_spacing_axis():
    acdc = Grid((7, 256, 208), (1.5625, 1.5625, 10.0))
    views = layout.choose_views(acdc)
    assert (views[0].axis, views[0].index) == (0, 3)  # the middle short-axis slice
    sideways = Grid((64, 48, 5), (9.0, 1.0, 1.0))  # slices along the last array axis
    v = layout.choose_views(sideways)[0]
    assert v.axis == 2 and v.index == 2 and v.shape == (64, 48)
    assert [v.axis for v in layout.choose_views(Grid((1, 32, 32), (1.0, 1.0, 5.0)))] == [0]
    assert [v.axis for v in layout.choose_views(Grid((20, 30)))] == [None]


def test_panels_have_the_physical_aspect_ratio():
    grid = Grid((7, 256, 208), (1.5625, 1.5625, 10.0))
    views = layout.choose_views(grid)
    mmpp = layout.mm_per_pixel(views, 6 * layout.widest(views))
    for v in views:
        rows_mm, cols_mm = v.extent_mm
        h, w = layout.screen_size(v, mmpp)
        assert h / w == pytest.approx(rows_mm / cols_mm, rel=0.03)
    edge_on = views[1]  # rows are the 7 slices of 10 mm, columns 208 pixels of 1.5625 mm
    assert layout.screen_size(edge_on, mmpp)[0] / layout.screen_size(edge_on, mmpp)[1] == pytest.approx(70 / 325, rel=0.03)


def test_small_images_are_enlarged_and_huge_ones_reduced():
    small = layout.choose_views(Grid((20, 20)))
    huge = layout.choose_views(Grid((2000, 2000)))
    assert max(layout.screen_size(small[0], layout.mm_per_pixel(small, 6 * layout.widest(small)))) >= 250
    assert max(layout.screen_size(huge[0], layout.mm_per_pixel(huge, 6 * layout.widest(huge)))) <= 400


def test_resample_maps_voxel_centres_consistently():
    arr = np.arange(12, dtype=np.float32).reshape(3, 4)
    near = layout.resample(arr, (6, 8), order=0)
    assert np.array_equal(near[::2, ::2], arr) and np.array_equal(near[1::2, 1::2], arr)
    # Screen position of voxel centre i, and the linear resample, agree on where voxels are.
    assert layout.to_screen(np.array([0.0, 2.0]), 3, 6).tolist() == [0.5, 4.5]
    lin = layout.resample(arr, (3, 4), order=1)
    assert np.allclose(lin, arr)


# ---------------------------------------------------------------------------- atomic writes
def test_failed_write_leaves_no_partial_file(tmp_path, monkeypatch):
    fixed, moving, field = _acdc_like_pair()
    target = tmp_path / "pic.png"
    save_jacobian_map(target, jacobian_determinant(field), field.grid)
    before = target.read_bytes()

    def broken_save(self, fp, *args, **kwargs):
        with open(fp, "wb") as fh:
            fh.write(b"\x89PNG partial")
        raise OSError("disk full")

    monkeypatch.setattr(PILImage.Image, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        save_overview(target, fixed, moving, warp(moving, field), field)
    with pytest.raises(OSError):
        save_roi_pairs(tmp_path / "new.png", fixed, moving, [])
    assert target.read_bytes() == before  # the old picture is untouched
    assert not (tmp_path / "new.png").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pic.png"]


def test_colour_bar_limit_adapts_but_stays_bounded():
    assert jacobian.jacobian_limit(np.ones(10)) == pytest.approx(1.25)
    assert jacobian.jacobian_limit(np.array([0.5, 1.0, 2.0])) == pytest.approx(2.0, rel=0.01)
    assert jacobian.jacobian_limit(np.array([1e-3, 1e3])) == pytest.approx(4.0)
    assert jacobian.jacobian_limit(np.array([-1.0, math.nan])) == pytest.approx(2.0)
