"""``fmreg train --model mask-guided`` and ``--method mask-guided`` through the CLI: runs and bad input."""

from __future__ import annotations

import json

import pytest

from fmreg.cli import main

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TRAIN = ["--model", "mask-guided", "--synthetic", "2d", "--size", "32", "32", "--width", "0.5", "--batch", "2",
         "--mask-channels", "3", "--checkpoint-every", "2", "-q"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("mg")
    assert main(["train", "-o", str(out), "--steps", "2", *TRAIN]) == 0
    return out


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    from fmreg import phantoms
    from fmreg.io.images import write_image

    root = tmp_path_factory.mktemp("pair")
    p = phantoms.make_pair(2, seed=2)
    for role in ("fixed", "moving", "fixed_labels", "moving_labels"):
        write_image(getattr(p, role), root / f"{role}.nii.gz")
    return root


def test_train_records_the_model_kind_and_its_loss_terms(run_dir):
    card = json.loads((run_dir / "model.json").read_text())
    assert card["model"] == "mask-guided" and card["config"]["mask_channels"] == 3
    assert {"ncc", "dice", "contour", "contrastive", "alignment", "diffusion"} <= set(card["final_loss"])


@pytest.mark.parametrize("method", ["mask-guided", "mask-guided-labels"])
def test_register_with_masks_from_the_segmenter_or_the_labels(run_dir, pair, tmp_path, method):
    out = tmp_path / "o"
    labels = ["--fixed-labels", str(pair / "fixed_labels.nii.gz"), "--moving-labels", str(pair / "moving_labels.nii.gz")]
    args = ["register", str(pair / "fixed.nii.gz"), str(pair / "moving.nii.gz"), "-o", str(out), "--method", method,
            "--param", f"weights={run_dir / 'checkpoint.pt'}", *labels, "-q"]
    assert main(args) == 0
    doc = json.loads((out / "result.json").read_text())
    assert doc["method"] == method and doc["mask_channels"] == 3 and (out / "roi_pairs.png").is_file()
    assert len(doc["roi_pairs"]) <= 3


def test_a_checkpoint_of_another_kind_is_named(run_dir, pair, tmp_path, capsys):
    args = ["register", str(pair / "fixed.nii.gz"), str(pair / "moving.nii.gz"), "-o", str(tmp_path / "o"),
            "--method", "gradicon", "--param", f"weights={run_dir / 'checkpoint.pt'}", "-q"]
    assert main(args) == 1
    assert "is a mask-guided checkpoint; --method gradicon needs a gradicon one" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("extra, message", [
    (["--size", "36", "36"], "multiples of 8"),
    (["--manifest", "pairs.csv"], "manifest pairs do not carry"),
    (["--mask-channels", "0"], "--mask-channels must be >= 1"),
])
def test_bad_mask_guided_settings_are_one_line(tmp_path, capsys, extra, message):
    assert main(["train", "-o", str(tmp_path / "r"), "--steps", "1", *TRAIN, *extra]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]


def test_slice_mask_channels_fill_each_slice_with_its_own_pairs():
    import torch

    from fmreg.correspond.pairs import RoiPair
    from fmreg.methods.mask_guided import slice_mask_channels

    shape = (3, 8, 8)
    a = torch.zeros(shape, dtype=torch.bool)
    a[1, 2:5, 2:5] = True
    b = torch.zeros(shape, dtype=torch.bool)
    b[1, 3:6, 3:6] = True
    slice_pair = RoiPair(a, b, 0.9, fixed_slice=1, moving_slice=1)
    vol_f = torch.zeros(shape, dtype=torch.bool)
    vol_f[0:2, 0:2, 0:2] = True
    vol_m = torch.zeros(shape, dtype=torch.bool)
    vol_m[:, 6:8, 6:8] = True
    volume_pair = RoiPair(vol_f, vol_m, 1.0, source="labels:1")
    mm, fm = slice_mask_channels([slice_pair, volume_pair], 0, torch.tensor([0, 1, 2]), (8, 8), 2)
    assert mm.shape == fm.shape == (3, 2, 8, 8)
    assert torch.equal(fm[1, 0], a[1].float()) and torch.equal(mm[1, 0], b[1].float())
    assert torch.equal(fm[0, 0], vol_f[0].float()) and torch.equal(mm[0, 0], vol_m[0].float())
    assert torch.equal(fm[1, 1], vol_f[1].float()) and torch.equal(mm[1, 1], vol_m[1].float())
    assert fm[2].sum() == 0 and mm[2].sum() == 0 and fm[0, 1].sum() == 0


def test_a_2d_model_registers_a_3d_stack_slice_by_slice(run_dir, tmp_path):
    from fmreg import phantoms
    from fmreg.io.images import write_image

    p = phantoms.make_pair(3, seed=1)
    for role in ("fixed", "moving", "fixed_labels", "moving_labels"):
        write_image(getattr(p, role), tmp_path / f"{role}.nii.gz")
    out = tmp_path / "o"
    labels = ["--fixed-labels", str(tmp_path / "fixed_labels.nii.gz"), "--moving-labels", str(tmp_path / "moving_labels.nii.gz")]
    assert main(["register", str(tmp_path / "fixed.nii.gz"), str(tmp_path / "moving.nii.gz"), "-o", str(out),
                 "--method", "mask-guided-labels", "--param", f"weights={run_dir / 'checkpoint.pt'}", *labels, "-q"]) == 0
    doc = json.loads((out / "result.json").read_text())
    assert "slice_axis" in doc


def test_the_consensus_pairs_count_only_when_the_images_confirm_the_move():
    import numpy as np
    import torch

    from fmreg.core.grid import Grid
    from fmreg.core.image import Image
    from fmreg.correspond.pairs import Correspondences
    from fmreg.methods.mask_guided import _consensus_holds

    grid = Grid((64, 64), (1.0, 1.0))
    y, x = torch.meshgrid(torch.arange(64.0), torch.arange(64.0), indexing="ij")
    fixed = Image(torch.sin(x / 4) * torch.cos(y / 5) + 0.02 * x, grid)
    moving = Image(torch.sin((x + 9) / 4) * torch.cos((y - 6) / 5) + 0.02 * (x + 9), grid)  # moving(p) = fixed(p - s)
    right, wrong = np.eye(3), np.eye(3)
    right[:2, 2] = [-9.0, 6.0]
    wrong[:2, 2] = [9.0, -6.0]
    assert _consensus_holds(fixed, moving, Correspondences([], [], None, right))
    assert not _consensus_holds(fixed, moving, Correspondences([], [], None, wrong))
    assert _consensus_holds(fixed, moving, Correspondences([], [], None, None))  # the identity consensus
