"""Mask-guided training data and ablation switches: segmenter masks, empty mask inputs, loss weights, --init."""

from __future__ import annotations

import json

import pytest
import torch

from fmreg.cli import main
from fmreg.core.grid import Grid
from fmreg.core.image import Image
from fmreg.correspond.pairs import find_roi_pairs
from fmreg.losses.mask_guided import mask_guided_loss
from fmreg.nn.mask_guided import MaskGuidedNet
from fmreg.segment.classical import ClassicalEncoder, ClassicalSegmenter
from fmreg.training.config import TrainConfig
from fmreg.training.data import MaskChannels, segmenter_mask_pairs
from fmreg.training.synthetic import SyntheticConfig, SyntheticPairs

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SHAPE = (64, 64)


def synthetic(seed=0):
    return SyntheticPairs(SyntheticConfig.default(2, shape=SHAPE), seed=seed)


def test_segmenter_masks_are_samreg_roi_pairs_by_decreasing_similarity():
    moving, fixed, _, _ = synthetic().batch(1)
    k = 3
    mm, fm = segmenter_mask_pairs(moving[0], fixed[0], k)
    grid = Grid(SHAPE)
    pairs = find_roi_pairs(Image(fixed[0, 0], grid), Image(moving[0, 0], grid), ClassicalSegmenter(), ClassicalEncoder())
    pairs = sorted(pairs, key=lambda p: -p.similarity)
    assert pairs, "the synthetic pair should give ROI pairs"
    assert mm.shape == fm.shape == (k, *SHAPE)
    for c in range(k):
        if c < len(pairs):
            torch.testing.assert_close(fm[c], pairs[c].fixed_mask.float())
            torch.testing.assert_close(mm[c], pairs[c].moving_mask.float())
        else:
            assert fm[c].sum() == 0 and mm[c].sum() == 0


def test_mask_sources_labels_segmenter_and_mixed():
    k = 3
    labels = MaskChannels(synthetic(), k, seed=5, segmenter_share=0.0)
    moving, fixed, mm, fm = labels.batch(2)
    _, _, ml, fl = synthetic().batch(2)
    for i in range(2):
        for c in range(k):
            if fm[i, c].any():
                # A label-map channel is the indicator of one label value in both maps.
                value = fl[i, 0][fm[i, c].bool()][0]
                torch.testing.assert_close(fm[i, c], (fl[i, 0] == value).float())
                torch.testing.assert_close(mm[i, c], (ml[i, 0] == value).float())
    segmented = MaskChannels(synthetic(), k, seed=5, segmenter_share=1.0)
    moving, fixed, mm, fm = segmented.batch(2)
    for i in range(2):
        expect_m, expect_f = segmenter_mask_pairs(moving[i], fixed[i], k)
        torch.testing.assert_close(mm[i], expect_m)
        torch.testing.assert_close(fm[i], expect_f)
    # Mixed: the same images as either source; the stream is seeded.
    a = MaskChannels(synthetic(), k, seed=5, segmenter_share=0.5).batch(4)
    b = MaskChannels(synthetic(), k, seed=5, segmenter_share=0.5).batch(4)
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y)
    torch.testing.assert_close(a[0], synthetic().batch(4)[0])


def test_without_mask_inputs_the_field_does_not_depend_on_the_masks():
    torch.manual_seed(0)
    net = MaskGuidedNet(2, 2, widths=(4, 8, 8, 16))
    for head in net.heads:
        torch.nn.init.normal_(head[-1].weight, std=0.05)
    g = torch.Generator().manual_seed(1)
    m, f = torch.rand((1, 1, 32, 32), generator=g), torch.rand((1, 1, 32, 32), generator=g)
    masks = [(torch.rand((1, 2, 32, 32), generator=g) > 0.5).float() for _ in range(4)]
    blind = [mask_guided_loss(net, m, f, masks[i], masks[i + 1], mask_inputs=False).terms for i in (0, 2)]
    seeing = [mask_guided_loss(net, m, f, masks[i], masks[i + 1]).terms for i in (0, 2)]
    torch.testing.assert_close(blind[0]["ncc"], blind[1]["ncc"])
    torch.testing.assert_close(blind[0]["diffusion"], blind[1]["diffusion"])
    assert float(seeing[0]["ncc"].detach()) != float(seeing[1]["ncc"].detach())


@pytest.mark.parametrize("settings, message", [
    ({"loss_weights": {"hausdorff": 1.0}}, "unknown loss weight 'hausdorff'"),
    ({"loss_weights": {"dice": -1.0}}, "--loss-weight dice must be a finite value >= 0"),
    ({"loss_weights": {"dice": float("nan")}}, "--loss-weight dice must be a finite value >= 0"),
    ({"mask_source": "oracle"}, "unknown mask source 'oracle'"),
    ({"squaring_steps": -2}, "--squaring-steps must be >= 0, got -2"),
])
def test_bad_mask_guided_training_settings(settings, message):
    from fmreg.errors import FmregError

    with pytest.raises(FmregError, match=message):
        TrainConfig(model="mask-guided", size=(64, 64), **settings)


TRAIN = ["--model", "mask-guided", "--synthetic", "2d", "--size", "32", "32", "--width", "0.5", "--batch", "2",
         "--mask-channels", "2", "-q"]


def test_ablation_switches_reach_the_card_and_a_blind_model_registers_without_masks(tmp_path):
    from fmreg import phantoms
    from fmreg.io.images import write_image

    run = tmp_path / "run"
    args = ["train", "-o", str(run), "--steps", "1", *TRAIN, "--no-mask-inputs", "--mask-source", "labels",
            "--loss-weight", "contour=0", "--loss-weight", "dice=0.5"]
    assert main(args) == 0
    card = json.loads((run / "model.json").read_text())
    assert card["config"]["mask_inputs"] is False and card["config"]["loss_weights"] == {"contour": 0.0, "dice": 0.5}
    assert "label-map" in card["data"]
    # New runs integrate velocities; a run from before the option loads with displacement heads.
    assert card["config"]["squaring_steps"] == 7
    older = {k: v for k, v in card["config"].items() if k != "squaring_steps"}
    assert TrainConfig.from_dict(older).squaring_steps == 0
    p = phantoms.make_pair(2, seed=2)
    for role in ("fixed", "moving"):
        write_image(getattr(p, role), tmp_path / f"{role}.nii.gz")
    out = tmp_path / "o"
    assert main(["register", str(tmp_path / "fixed.nii.gz"), str(tmp_path / "moving.nii.gz"), "-o", str(out),
                 "--method", "mask-guided", "--param", f"weights={run / 'checkpoint.pt'}", "-q"]) == 0
    assert json.loads((out / "result.json").read_text())["roi_pairs"] == []


def test_fine_tuning_starts_from_the_weights_and_refuses_another_kind(tmp_path, capsys):
    base = tmp_path / "base"
    assert main(["train", "-o", str(base), "--steps", "1", *TRAIN, "--mask-source", "labels"]) == 0
    tuned = tmp_path / "tuned"
    assert main(["train", "-o", str(tuned), "--steps", "1", *TRAIN, "--mask-source", "labels",
                 "--init", str(base / "checkpoint.pt"), "--lr", "1e-12"]) == 0
    a = torch.load(base / "checkpoint.pt", weights_only=False)["model"]
    b = torch.load(tuned / "checkpoint.pt", weights_only=False)["model"]
    # One Adam step of lr 1e-12 from the --init weights: equal to them within 1e-9.
    for key in a:
        torch.testing.assert_close(b[key].float(), a[key].float(), atol=1e-9, rtol=0)
    grad = tmp_path / "gradicon"
    assert main(["train", "-o", str(grad), "--steps", "1", "--synthetic", "2d", "--size", "32", "32", "--depth", "3",
                 "--width", "0.1", "--batch", "1", "-q"]) == 0
    capsys.readouterr()
    assert main(["train", "-o", str(tmp_path / "bad"), "--steps", "1", *TRAIN, "--init", str(grad / "checkpoint.pt")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is a gradicon checkpoint; --model mask-guided needs a mask-guided one" in err[0]


def test_loss_weight_needs_name_equals_value(tmp_path, capsys):
    assert main(["train", "-o", str(tmp_path / "r"), "--steps", "1", *TRAIN, "--loss-weight", "contour"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--loss-weight takes NAME=VALUE" in err[0]
