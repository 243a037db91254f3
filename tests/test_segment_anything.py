"""The SAM backend with a tiny randomly initialised SamModel (no weights to download).

The model is saved and loaded through :func:`load_sam_model`, the path users take with real
checkpoints. Its outputs are meaningless; the tests check geometry, filtering and caching.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("transformers")

from fmreg.errors import FmregError  # noqa: E402
from fmreg.segment.base import Encoder, RoiProposals, Segmenter  # noqa: E402
from fmreg.segment.segment_anything import (  # noqa: E402
    PIXEL_MEAN,
    PIXEL_STD,
    SamBackend,
    intensity_to_rgb255,
    load_sam_model,
    mask_boxes,
    mask_iou_matrix,
    mask_nms,
    pad_bottom_right,
    point_grid,
    postprocess_masks,
    preprocess,
    remove_small_regions,
    resize_longest_side,
    resized_shape,
    stability_score,
)

IMAGE_SIZE = 128  # model input side; embedding 8 x 8, decoder masks 32 x 32
CHANNELS = 32


def _tiny_sam():
    from transformers import (
        SamConfig,
        SamMaskDecoderConfig,
        SamModel,
        SamPromptEncoderConfig,
        SamVisionConfig,
    )

    vision = SamVisionConfig(
        hidden_size=32,
        output_channels=CHANNELS,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=IMAGE_SIZE,
        patch_size=16,
        window_size=4,
        global_attn_indexes=[1],
        num_pos_feats=CHANNELS // 2,  # sin + cos of these gives the prompt channels
        mlp_dim=64,
    )
    prompt = SamPromptEncoderConfig(
        hidden_size=CHANNELS, image_size=IMAGE_SIZE, patch_size=16, mask_input_channels=8
    )
    decoder = SamMaskDecoderConfig(
        hidden_size=CHANNELS,
        mlp_dim=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        iou_head_hidden_dim=32,
    )
    model = SamModel(
        SamConfig(vision_config=vision, prompt_encoder_config=prompt, mask_decoder_config=decoder)
    ).eval()
    # SAM's init (vision std 1e-10) gives all-zero logits; wider weights give masks that
    # pass the filters, so everything mode has something to return.
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.copy_(torch.randn(p.shape, generator=gen) * (1.5 / p[0].numel() ** 0.5))
    return model


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tiny-sam")
    _tiny_sam().save_pretrained(path)
    return path


@pytest.fixture
def backend(model_dir) -> SamBackend:
    return SamBackend(
        load_sam_model(model_dir),
        points_per_side=4,
        points_per_batch=16,
        pred_iou_thresh=0.0,
        stability_score_thresh=0.0,
    )


def _blobs(h: int, w: int) -> torch.Tensor:
    yy, xx = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    img = torch.exp(-((yy - 0.3 * h) ** 2 + (xx - 0.4 * w) ** 2) / (0.02 * h * w))
    img = img + 0.5 * ((yy - 0.7 * h).abs() < 0.1 * h) * ((xx - 0.6 * w).abs() < 0.2 * w)
    return (100.0 * img + 20.0).float()


# ------------------------------------------------------------------ geometry


@pytest.mark.parametrize(
    ("hw", "resized"), [((60, 100), (77, 128)), ((100, 40), (128, 51)), ((128, 128), (128, 128))]
)
def test_preprocess_resizes_longest_side_and_pads_bottom_right(hw, resized):
    assert resized_shape(*hw, IMAGE_SIZE) == resized
    pixels, resized_hw = preprocess(_blobs(*hw), IMAGE_SIZE)
    assert pixels.shape == (1, 3, IMAGE_SIZE, IMAGE_SIZE)
    assert pixels.dtype == torch.float32
    assert resized_hw == resized
    h, w = resized
    assert torch.all(pixels[..., h:, :] == 0) and torch.all(pixels[..., :, w:] == 0)
    # The image fills the top-left block: its last row and column are not padding.
    assert pixels[..., h - 1, :w].abs().sum() > 0 and pixels[..., :h, w - 1].abs().sum() > 0


def test_preprocess_normalises_a_known_image():
    # 64 x 128 already has longest side 128: no resampling, so values are exact.
    image = torch.zeros(64, 128)
    image[:, 64:] = 10.0
    pixels, resized_hw = preprocess(image, IMAGE_SIZE)
    assert resized_hw == (64, 128)
    for c in range(3):
        dark = (0.0 - PIXEL_MEAN[c]) / PIXEL_STD[c]
        bright = (255.0 - PIXEL_MEAN[c]) / PIXEL_STD[c]
        torch.testing.assert_close(pixels[0, c, :64, :64], torch.full((64, 64), dark))
        torch.testing.assert_close(pixels[0, c, :64, 64:], torch.full((64, 64), bright))
        assert torch.all(pixels[0, c, 64:] == 0)


def test_percentile_window_ignores_outliers_and_constant_slices():
    image = torch.linspace(0, 1, 10_000).reshape(100, 100)
    image[0, 0] = 1e6  # one hot voxel must not squash everything else to black
    rgb = intensity_to_rgb255(image)
    assert rgb.min() == 0 and rgb.max() == 255
    assert 100 < float(rgb[50, 0]) < 155
    assert torch.all(intensity_to_rgb255(torch.full((5, 7), 3.0)) == 0)


@pytest.mark.parametrize("hw", [(90, 150), (150, 90)])
def test_mask_survives_the_pre_and_post_geometry(hw):
    h, w = hw
    mask = torch.zeros(h, w, dtype=torch.bool)
    mask[int(0.2 * h) : int(0.7 * h), int(0.5 * w) : int(0.9 * w)] = True

    # Forward geometry of preprocess, then down to the decoder's low-res mask grid.
    resized = resize_longest_side(mask[None, None].float(), IMAGE_SIZE)
    padded = pad_bottom_right(resized, IMAGE_SIZE)
    low_res = F.interpolate(padded, size=(32, 32), mode="area")[:, 0]
    logits = postprocess_masks(8.0 * (low_res - 0.5), tuple(resized.shape[-2:]), hw, IMAGE_SIZE)

    assert logits.shape == (1, h, w)
    back = logits[0] > 0
    inter = (back & mask).sum().item()
    union = (back | mask).sum().item()
    assert inter / union > 0.9

    def centroid(m):
        idx = m.nonzero().float()
        return idx.mean(0)

    assert torch.allclose(centroid(back), centroid(mask), atol=1.0)


def test_point_grid_is_cell_centres_x_then_y():
    grid = point_grid(2)
    expected = torch.tensor([[0.25, 0.25], [0.75, 0.25], [0.25, 0.75], [0.75, 0.75]])
    torch.testing.assert_close(grid, expected)


# ------------------------------------------------------------------ scoring


def test_stability_score_matches_hand_computation():
    logits = torch.tensor(
        [
            [[2.0, 1.5, 0.5], [-0.5, -2.0, 1.2], [0.9, -0.9, -1.5]],
            [[-3.0, -3.0, -3.0], [-3.0, -3.0, -3.0], [-3.0, -3.0, -3.0]],
        ]
    )
    # Mask 0: > +1 -> {2.0, 1.5, 1.2} = 3 pixels; > -1 -> those + {0.5, -0.5, 0.9, -0.9} = 7.
    score = stability_score(logits, offset=1.0)
    torch.testing.assert_close(score, torch.tensor([3 / 7, 0.0]))
    # A smaller offset: > 0.5 -> {2, 1.5, 1.2, 0.9} = 4; > -0.5 -> + {0.5} = 5 (-0.5 is not > -0.5).
    torch.testing.assert_close(stability_score(logits[:1], offset=0.5), torch.tensor([4 / 5]))


def test_mask_nms_keeps_the_best_of_each_overlapping_group():
    masks = torch.zeros(4, 20, 20, dtype=torch.bool)
    masks[0, 2:12, 2:12] = True  # A
    masks[1, 3:13, 2:12] = True  # B: A moved down one row, IoU 90/110
    masks[2, 14:18, 14:18] = True  # C: disjoint
    masks[3, 4:6, 4:6] = True  # D: inside A, IoU 4/100
    scores = torch.tensor([0.8, 0.9, 0.7, 0.95])

    iou = mask_iou_matrix(masks)
    assert iou[0, 1].item() == pytest.approx(90 / 110)
    assert iou[0, 3].item() == pytest.approx(4 / 100)
    assert iou[2, 0].item() == 0.0
    torch.testing.assert_close(iou.diagonal(), torch.ones(4))

    assert mask_nms(masks, scores, iou_thresh=0.7).tolist() == [3, 1, 2]
    # Above A-B's IoU nothing is suppressed.
    assert mask_nms(masks, scores, iou_thresh=0.85).tolist() == [3, 1, 0, 2]
    assert mask_nms(masks[:0], scores[:0]).numel() == 0


def _greedy_nms_reference(masks, scores, thresh):
    iou = mask_iou_matrix(masks)
    kept = []
    for i in torch.argsort(scores, descending=True, stable=True).tolist():
        if all(iou[i, j] <= thresh for j in kept):
            kept.append(i)
    return kept


@pytest.mark.parametrize("thresh", [0.3, 0.7])
def test_mask_nms_equals_greedy_nms_on_the_full_iou_matrix(thresh):
    gen = torch.Generator().manual_seed(2)
    yy, xx = torch.meshgrid(torch.arange(40), torch.arange(50), indexing="ij")
    centres = torch.rand(60, 2, generator=gen) * torch.tensor([40.0, 50.0])
    radii = 3 + 12 * torch.rand(60, generator=gen)
    masks = ((yy - centres[:, :1, None]) ** 2 + (xx - centres[:, 1:, None]) ** 2) < radii[
        :, None, None
    ] ** 2
    masks[5] = False  # an empty mask never suppresses nor is suppressed
    scores = torch.rand(60, generator=gen)
    assert mask_nms(masks, scores, thresh).tolist() == _greedy_nms_reference(masks, scores, thresh)


def test_mask_boxes_are_end_exclusive():
    masks = torch.zeros(2, 6, 7, dtype=torch.bool)
    masks[0, 1:4, 2:7] = True
    assert mask_boxes(masks).tolist() == [[1, 2, 4, 7], [0, 0, 0, 0]]


def test_mask_iou_matrix_blocks_agree_with_one_block():
    gen = torch.Generator().manual_seed(1)
    masks = torch.rand(7, 9, 11, generator=gen) > 0.5
    torch.testing.assert_close(mask_iou_matrix(masks, block=3), mask_iou_matrix(masks, block=64))


def test_remove_small_regions_fills_holes_and_drops_islands():
    mask = torch.zeros(20, 20, dtype=torch.bool)
    mask[2:12, 2:12] = True
    mask[5, 5] = False  # 1-pixel hole
    mask[16, 16] = True  # 1-pixel island
    cleaned = remove_small_regions(mask, min_area=4)
    expected = torch.zeros(20, 20, dtype=torch.bool)
    expected[2:12, 2:12] = True
    assert torch.equal(cleaned, expected)
    assert torch.equal(remove_small_regions(mask, 0), mask)


# ------------------------------------------------------------------ backend


def test_backend_implements_both_protocols(backend):
    assert backend.name == "sam"
    assert isinstance(backend, Segmenter)
    assert isinstance(backend, Encoder)
    assert backend.image_size == IMAGE_SIZE


def test_everything_mode_returns_scored_masks(backend):
    image = _blobs(60, 90)
    props = backend.segment(image)
    assert isinstance(props, RoiProposals)
    k = len(props)
    assert 0 < k <= 3 * 4 * 4
    assert props.masks.shape == (k, 60, 90) and props.masks.dtype == torch.bool
    assert props.scores.shape == (k,) and props.stability.shape == (k,)
    assert props.scores.dtype == torch.float32 and props.stability.dtype == torch.float32
    assert torch.all((props.scores >= 0) & (props.scores <= 1))
    assert torch.all((props.stability >= 0) & (props.stability <= 1))
    assert torch.all(props.masks.flatten(1).any(1)), "empty masks are dropped"
    # Callers may modify or differentiate through the results: no inference-mode tensors.
    assert not props.masks.is_inference() and not props.scores.is_inference()
    assert torch.all(props.scores[:-1] >= props.scores[1:]), "best first"
    iou = mask_iou_matrix(props.masks)
    off_diagonal = iou[~torch.eye(k, dtype=torch.bool)]
    assert off_diagonal.numel() == 0 or off_diagonal.max() <= backend.nms_iou_thresh


def test_prompt_batching_does_not_change_the_result(backend):
    image = _blobs(60, 90)
    whole = backend.segment(image)
    backend.points_per_batch = 5  # 16 prompts -> batches of 5, 5, 5, 1
    batched = backend.segment(image)
    assert torch.equal(whole.masks, batched.masks)
    torch.testing.assert_close(whole.scores, batched.scores, rtol=1e-5, atol=1e-5)


def test_everything_mode_thresholds_filter(model_dir):
    image = _blobs(60, 90)
    loose = SamBackend(
        model_dir, points_per_side=4, pred_iou_thresh=0.0, stability_score_thresh=0.0
    )
    strict = SamBackend(
        loose.model, points_per_side=4, pred_iou_thresh=0.5, stability_score_thresh=0.9
    )
    a, b = loose.segment(image), strict.segment(image)
    assert len(b) <= len(a)
    assert torch.all(b.scores >= 0.5) and torch.all(b.stability >= 0.9)
    none = SamBackend(loose.model, points_per_side=2, pred_iou_thresh=1e9)
    empty = none.segment(image)
    assert len(empty) == 0 and empty.masks.shape == (0, 60, 90)


def test_features_cover_the_unpadded_image(backend):
    square = backend.features(_blobs(200, 200))
    assert square.shape == (CHANNELS, 8, 8) and square.dtype == torch.float32
    assert not square.is_inference()
    # 100 x 200 -> 64 x 128 of the 128 input -> 4 x 8 of the 8 x 8 embedding cells.
    wide = backend.features(_blobs(100, 200))
    assert wide.shape == (CHANNELS, 4, 8)
    # 90 x 150 -> 77 x 128 -> ceil(77 / 16) = 5 rows.
    assert backend.features(_blobs(90, 150)).shape == (CHANNELS, 5, 8)


def test_encoder_runs_once_per_slice(backend):
    calls = []
    handle = backend.model.vision_encoder.register_forward_hook(lambda *a: calls.append(1))
    try:
        image = _blobs(80, 80)
        backend.segment(image)
        feats = backend.features(image)
        backend.features(image.clone())  # same values, another tensor: still cached
        assert len(calls) == 1
        other = image.clone()
        other[0, 0] += 1.0
        backend.features(other)
        assert len(calls) == 2
        backend.clear_cache()
        torch.testing.assert_close(backend.features(image), feats)
        assert len(calls) == 3
    finally:
        handle.remove()


def test_bad_slices_are_user_errors(backend):
    with pytest.raises(FmregError, match="2D"):
        backend.segment(torch.zeros(2, 8, 8))
    bad = torch.zeros(8, 8)
    bad[1, 1] = math.nan
    with pytest.raises(FmregError, match="NaN"):
        backend.features(bad)


# ------------------------------------------------------------------ loading


def test_missing_local_folder_names_the_path(tmp_path):
    missing = tmp_path / "no-such-sam"
    with pytest.raises(FmregError, match="no-such-sam") as info:
        load_sam_model(missing)
    assert str(missing) in str(info.value)
    assert "facebook/sam-vit-base" in str(info.value)
    assert "\n" not in str(info.value)
    with pytest.raises(FmregError, match="no-such-sam"):
        SamBackend(str(missing))


def test_missing_transformers_names_the_extra(monkeypatch, model_dir):
    from fmreg.errors import MissingExtraError

    monkeypatch.setitem(sys.modules, "transformers", None)  # what an absent package looks like
    with pytest.raises(MissingExtraError, match=r"fmreg\[sam\]") as info:
        load_sam_model(model_dir)
    assert info.value.extra == "sam"


def test_folder_without_config_is_rejected(tmp_path):
    with pytest.raises(FmregError, match="config.json"):
        load_sam_model(tmp_path)


def test_unreachable_hub_id_is_a_one_line_error(monkeypatch, tmp_path):
    import transformers

    def offline(*args, **kwargs):
        raise OSError("We couldn't connect to 'https://huggingface.co'\nmore detail")

    monkeypatch.setattr(transformers.SamModel, "from_pretrained", offline)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FmregError) as info:
        load_sam_model("someorg/some-sam")
    message = str(info.value)
    assert "\n" not in message
    assert "someorg/some-sam" in message and str(tmp_path / "someorg" / "some-sam") in message
    assert "couldn't connect" in message


def test_folder_of_another_model_type_is_rejected(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "sam2"}')
    with pytest.raises(FmregError, match="sam2"):
        load_sam_model(tmp_path)


def test_folder_without_weights_is_a_one_line_error(model_dir, tmp_path):
    (tmp_path / "config.json").write_text((model_dir / "config.json").read_text())
    with pytest.raises(FmregError, match="cannot load SAM model") as info:
        load_sam_model(tmp_path)
    assert "\n" not in str(info.value)


def test_loaded_model_matches_the_saved_one(model_dir):
    model = load_sam_model(model_dir)
    assert model.config.vision_config.image_size == IMAGE_SIZE
    assert not model.training
