"""The weight-free SAMReg backend: classical region proposals and handcrafted features."""

import math
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.testing import assert_close

from fmreg.core.intensity import normalize
from fmreg.errors import FmregError
from fmreg.segment.classical import (
    ClassicalEncoder,
    ClassicalSegmenter,
    classical_features,
    mind_ssc,
    propose_regions,
)
from fmreg.segment.classical.encoder import HIST_WEIGHT
from fmreg.segment.filtering import filter_proposals
from fmreg.correspond.matching import match_rois, similarity_matrix
from fmreg.segment.base import Encoder, Segmenter
from fmreg.correspond.prototypes import roi_prototypes

DATA_2D = Path(__file__).resolve().parents[2] / "shared" / "data" / "2d"

# (centre row, centre column, radius) disks and (row0, row1, col0, col1) squares on a 160x160
# canvas, all of distinct intensities on a 0.2 background.
_BRIGHT_DISK = (50, 50, 18)
_SQUARE = (90, 125, 30, 65)
_DARK_DISK = (60, 115, 14)


def _shapes(offset=(0, 0), size=(160, 160), scale=1.0, noise=0.02, seed=0):
    """Noisy slice with three known shapes shifted by ``offset`` (rows, columns) px."""
    h, w = size
    yy, xx = np.mgrid[:h, :w].astype(np.float64) / scale
    dy, dx = offset
    img = np.full(size, 0.2)
    r, c, rad = _BRIGHT_DISK
    disk = (yy - r - dy) ** 2 + (xx - c - dx) ** 2 <= rad**2
    r0, r1, c0, c1 = _SQUARE
    square = (yy >= r0 + dy) & (yy < r1 + dy) & (xx >= c0 + dx) & (xx < c1 + dx)
    r, c, rad = _DARK_DISK
    dark = (yy - r - dy) ** 2 + (xx - c - dx) ** 2 <= rad**2
    img[disk], img[square], img[dark] = 0.9, 0.55, 0.38
    img = img + np.random.default_rng(seed).normal(0.0, noise, size)
    # Arbitrary intensity units: the backend must normalise them itself.
    return torch.from_numpy((1000.0 * img - 300.0).astype(np.float32)), [
        torch.from_numpy(m) for m in (disk, square, dark)
    ]


def _iou(masks, target):
    inter = (masks & target).flatten(1).sum(1).float()
    union = (masks | target).flatten(1).sum(1).float()
    return inter / union.clamp_min(1)


def _load_png(path: Path) -> torch.Tensor:
    from PIL import Image

    return torch.from_numpy(np.asarray(Image.open(path).convert("L"), dtype=np.float32))


# --------------------------------------------------------------------------- segmenter


def test_protocols():
    assert isinstance(ClassicalSegmenter(), Segmenter)
    assert isinstance(ClassicalEncoder(), Encoder)
    assert ClassicalSegmenter.name == ClassicalEncoder.name == "classical"
    with pytest.raises(FmregError, match="unknown"):
        ClassicalSegmenter(scale=3)
    with pytest.raises(FmregError, match="unknown"):
        ClassicalEncoder(sigma=3)


def test_normalize_uses_robust_percentiles():
    img = np.linspace(0.0, 1.0, 101, dtype=np.float32).reshape(1, -1).repeat(4, 0)
    img[0, 0] = 1e6  # a hot pixel must not compress the range
    out = normalize(img)
    assert out.min() == 0.0 and out.max() == 1.0
    assert_close(torch.from_numpy(out[1, 50:51]), torch.tensor([0.5]), atol=0.02, rtol=0)
    assert (normalize(np.full((5, 5), 7.0)) == 0).all()


def test_segmenter_finds_each_known_shape():
    img, shapes = _shapes()
    props = ClassicalSegmenter().segment(img)
    k = len(props)
    assert props.masks.shape == (k, 160, 160) and props.masks.dtype == torch.bool
    assert props.scores.shape == props.stability.shape == (k,)
    for q in (props.scores, props.stability):
        assert q.dtype == torch.float32 and bool(((q >= 0) & (q <= 1)).all())
    assert bool((props.scores[:-1] >= props.scores[1:]).all())  # sorted by score
    for shape in shapes:
        best = int(_iou(props.masks, shape).argmax())
        assert float(_iou(props.masks, shape)[best]) > 0.9
        # Clean, isolated shapes are exactly what a SAM-like score and stability call sure.
        assert float(props.scores[best]) > 0.9 and float(props.stability[best]) > 0.9


def test_filtered_proposals_are_the_shapes():
    img, shapes = _shapes()
    for kw in ({}, ClassicalSegmenter.filter_thresholds):
        kept = filter_proposals(ClassicalSegmenter().segment(img), **kw)
        assert 3 <= len(kept) <= 6
        for shape in shapes:
            assert float(_iou(kept.masks, shape).max()) > 0.9


def test_large_slices_are_proposed_at_working_size_and_returned_on_their_grid():
    img, shapes = _shapes(size=(400, 320), scale=2.5)
    props = propose_regions(img, work_size=160)
    assert props.masks.shape[1:] == (400, 320)
    for shape in shapes:
        assert float(_iou(props.masks, shape).max()) > 0.9


def test_segmenter_degenerate_and_invalid_slices():
    flat = propose_regions(torch.full((40, 40), 3.0))
    assert flat.masks.shape[1:] == (40, 40)
    with pytest.raises(FmregError):
        propose_regions(torch.zeros(4, 40, 40))
    bad = torch.zeros(40, 40)
    bad[3, 3] = float("nan")
    with pytest.raises(FmregError):
        propose_regions(bad)


def test_segmenter_is_fast_on_a_256_slice():
    img, _ = _shapes(size=(256, 256), scale=1.6, noise=0.05)
    propose_regions(img)  # warm-up: imports, allocator
    t0 = time.process_time()
    propose_regions(img)
    # Target ~0.2 s on one core; the bound leaves room for slow or busy CI machines.
    assert time.process_time() - t0 < 1.5


# --------------------------------------------------------------------------- encoder


def test_mind_ssc_range_and_flat_image():
    x = torch.rand(1, 1, 24, 30)
    m = mind_ssc(x)
    assert m.shape == (1, 6, 24, 30)
    assert bool(((m > 0) & (m <= 1)).all())
    assert_close(m.amax(dim=1), torch.ones(1, 24, 30))
    assert_close(mind_ssc(torch.full((1, 1, 8, 8), 2.0)), torch.ones(1, 6, 8, 8))


def test_features_shapes_and_centring():
    img, _ = _shapes()
    f = classical_features(img, position_weight=0.0)
    assert f.shape == (10 + 12 + 9, 160, 160) and f.dtype == torch.float32
    assert bool(torch.isfinite(f).all())
    # The soft histogram sums to 1 per pixel (before its group weight); the structure groups
    # are centred on the slice.
    assert_close(f[:10].sum(0), torch.full((160, 160), HIST_WEIGHT / math.sqrt(10)))
    assert_close(f[22:].mean(dim=(1, 2)), torch.zeros(9), atol=0.1, rtol=0)
    g = ClassicalEncoder(stride=3, hist_bins=6).features(img)
    assert g.shape == (6 + 12 + 9 + 2, math.ceil(160 / 3), math.ceil(160 / 3))


def test_prototypes_of_the_same_shape_agree_across_images():
    img_a, shapes_a = _shapes(seed=0)
    img_b, shapes_b = _shapes(offset=(7, -9), seed=1)
    enc = ClassicalEncoder()
    pa = roi_prototypes(enc.features(img_a), torch.stack(shapes_a))
    pb = roi_prototypes(enc.features(img_b), torch.stack(shapes_b))
    s = similarity_matrix(pa, pb)
    assert bool((s.diagonal() > 0.95).all())
    off = s[~torch.eye(3, dtype=torch.bool)]
    assert bool((off < 0.6).all())


# --------------------------------------------------------------------------- end to end


def test_end_to_end_shifted_shapes_match_themselves():
    offset = (7, -9)
    img_m, shapes_m = _shapes(seed=0)
    img_f, shapes_f = _shapes(offset=offset, seed=1)
    seg, enc = ClassicalSegmenter(), ClassicalEncoder()
    pm = filter_proposals(seg.segment(img_m), **seg.filter_thresholds)
    pf = filter_proposals(seg.segment(img_f), **seg.filter_thresholds)
    s = similarity_matrix(
        roi_prototypes(enc.features(img_m), pm.masks), roi_prototypes(enc.features(img_f), pf.masks)
    )
    matches = {m.moving_index: m.fixed_index for m in match_rois(s)}
    for shape_m, shape_f in zip(shapes_m, shapes_f):
        i = int(_iou(pm.masks, shape_m).argmax())
        j = int(_iou(pf.masks, shape_f).argmax())
        assert matches.get(i) == j
        # The matched masks are the shape moved by the known offset.
        moved = torch.roll(pm.masks[i], shifts=offset, dims=(0, 1))
        assert float(_iou(moved[None], pf.masks[j])[0]) > 0.85


# --------------------------------------------------------------------------- real data

_CARDIAC = DATA_2D / "cardiac_mr"
_PROSTATE = DATA_2D / "prostate_mr"


@pytest.mark.slow
@pytest.mark.skipif(not _CARDIAC.is_dir(), reason="shared data not available")
def test_real_cardiac_pair_gives_plausible_rois_and_matches():
    moving = _load_png(_CARDIAC / "image1_R.png")
    fixed = _load_png(_CARDIAC / "image1_T.png")
    lv_m = _load_png(_CARDIAC / "label1_R.png") > 127
    lv_f = _load_png(_CARDIAC / "label1_T.png") > 127
    seg, enc = ClassicalSegmenter(), ClassicalEncoder()
    pm = filter_proposals(seg.segment(moving), **seg.filter_thresholds)
    pf = filter_proposals(seg.segment(fixed), **seg.filter_thresholds)
    assert 5 <= len(pm) <= 60 and 5 <= len(pf) <= 60
    # The left-ventricle blood pool is among the ROIs of both frames.
    assert float(_iou(pm.masks, lv_m).max()) > 0.7
    assert float(_iou(pf.masks, lv_f).max()) > 0.5
    s = similarity_matrix(
        roi_prototypes(enc.features(moving), pm.masks),
        roi_prototypes(enc.features(fixed), pf.masks),
    )
    matches = match_rois(s, top_k=5)
    assert len(matches) == 5
    # Intra-subject frames: the five most similar pairs lie at nearly the same place.
    for m in matches:
        cm = pm.masks[m.moving_index].nonzero().float().mean(0)
        cf = pf.masks[m.fixed_index].nonzero().float().mean(0)
        assert float((cm - cf).norm()) < 15.0


@pytest.mark.slow
@pytest.mark.skipif(not _PROSTATE.is_dir(), reason="shared data not available")
def test_real_prostate_pair_gives_a_reasonable_number_of_rois():
    seg = ClassicalSegmenter()
    for name in ("image1.png", "image2.png"):
        kept = filter_proposals(seg.segment(_load_png(_PROSTATE / name)), **seg.filter_thresholds)
        assert 5 <= len(kept) <= 60
