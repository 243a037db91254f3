"""``fmreg train`` and ``--method gradicon`` through the CLI and the API: geometry and bad input."""

from __future__ import annotations

import json

import pytest
import torch
from torch.testing import assert_close

from fmreg.cli import main
from fmreg.core.grid import Frame, Grid
from fmreg.core.image import Image
from fmreg.methods.gradicon import GradICONMethod
from fmreg.nn.images import physical_field, slicewise_field, stack_inputs
from fmreg.transforms.displacement import DisplacementTransform
from fmreg.transforms.affine import AffineTransform

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TRAIN = ["--synthetic", "2d", "--size", "32", "32", "--width", "0.125", "--depth", "3", "--batch", "2",
         "--checkpoint-every", "2", "-q"]


def test_the_identity_map_between_two_fields_of_view_is_their_physical_relation():
    # Fixed and moving cover different boxes: the network's identity (normalized → normalized)
    # maps each fixed voxel to the moving point at the same relative position.
    fixed = Grid((11, 21), (1.0, 0.5), (0.0, 0.0))
    moving = Grid((21, 11), (2.0, 1.0), (10.0, -5.0))
    field = physical_field(AffineTransform.identity(fixed), fixed, moving)
    # Extents (x, y): fixed 20 × 5 mm from (0, 0), moving 20 × 20 mm from (10, -5).
    x = fixed.coordinates(Frame.PHYSICAL)
    rel = x / torch.tensor([20.0, 5.0]).reshape(2, 1, 1)
    expected = torch.tensor([10.0, -5.0]).reshape(2, 1, 1) + rel * torch.tensor([20.0, 20.0]).reshape(2, 1, 1)
    assert field.frame == Frame.PHYSICAL
    assert_close(field.mapped_points(Frame.PHYSICAL), expected, atol=1e-4, rtol=0)


def _rotation_about_z(degrees: float):
    import math

    c, s = math.cos(math.radians(degrees)), math.sin(math.radians(degrees))
    return (c, -s, 0.0, s, c, 0.0, 0.0, 0.0, 1.0)


def test_slicewise_maps_shift_each_slice_in_plane_and_keep_its_slice():
    # An oblique, anisotropic stack (slice axis = array axis 0, 6 mm); each slice's 2D map is a
    # constant in-plane shift, d_j normalized units along x for slice j.
    fixed = Grid((4, 9, 11), (0.5, 0.8, 6.0), (2.0, -3.0, 10.0), _rotation_about_z(30.0))
    shifts = torch.tensor([0.1, -0.2, 0.0, 0.3])
    u = torch.zeros((4, 2, 9, 11))
    u[:, 0] = shifts.reshape(4, 1, 1)
    transform = DisplacementTransform(u, Grid((9, 11)))
    field = slicewise_field(transform, fixed, fixed, 0, torch.linspace(-1, 1, 4))
    # Normalized x unit = (11 − 1) / 2 voxels of 0.5 mm = 2.5 mm along the grid's x direction.
    direction_x = torch.tensor(_rotation_about_z(30.0)).reshape(3, 3)[:, 0]
    expected = direction_x.reshape(3, 1, 1, 1) * (2.5 * shifts).reshape(1, 4, 1, 1)
    assert_close(field.data, expected.expand(3, 4, 9, 11), atol=1e-5, rtol=0)


def test_stack_inputs_pair_each_fixed_slice_with_the_moving_slice_at_its_relative_position():
    g = torch.Generator().manual_seed(0)
    fixed = Image(torch.rand((5, 12, 10), generator=g), Grid((5, 12, 10), (1.0, 1.0, 8.0)))
    moving = Image(torch.arange(9.0).reshape(9, 1, 1).expand(9, 12, 10).contiguous(), Grid((9, 12, 10), (1.0, 1.0, 4.0)))
    f, m, positions = stack_inputs(fixed, moving, (16, 16), 0, "mr")
    assert f.shape == m.shape == (5, 1, 16, 16)
    # Fixed slices at relative positions 0, 1/4, ..., 1: moving slices 0, 2, 4, 6, 8.
    assert_close(positions, torch.linspace(-1, 1, 5))
    assert_close(m[:, 0, 0, 0], torch.tensor([0.0, 2.0, 4.0, 6.0, 8.0]) / 8.0)
    # The through-plane component maps fixed slice j onto moving slice 2j: the same mm here.
    identity = DisplacementTransform(torch.zeros((5, 2, 12, 10)), Grid((12, 10)))
    field = slicewise_field(identity, fixed.grid, moving.grid, 0, positions)
    assert_close(field.data, torch.zeros((3, 5, 12, 10)), atol=1e-5, rtol=0)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    assert main(["train", "-o", str(out), "--steps", "2", *TRAIN]) == 0
    return out


def test_train_writes_checkpoint_curves_and_card(run_dir):
    card = json.loads((run_dir / "model.json").read_text())
    assert card["steps"] == 2 and card["optimizer"] == "adam" and card["input_size"] == [32, 32]
    assert "synthetic" in card["data"] and card["command"].startswith("fmreg train -o") and card["wall_time_s"] >= 0
    assert (run_dir / "loss.png").read_bytes()[:4] == b"\x89PNG"


def test_a_run_folder_is_never_silently_reused(run_dir, capsys):
    before = (run_dir / "checkpoint.pt").read_bytes()
    assert main(["train", "-o", str(run_dir), "--steps", "2", *TRAIN]) == 1
    assert "holds another run (checkpoint.pt): pass --resume to continue it or --overwrite" in capsys.readouterr().err
    assert (run_dir / "checkpoint.pt").read_bytes() == before


@pytest.mark.parametrize("args, message", [
    (["--steps", "0"], "--steps must be >= 1, got 0"),
    (["--steps", "2", "--init", "/nonexistent.pt"], "no checkpoint at /nonexistent.pt"),
    (["--steps", "2", "--size", "8", "8"], "too small"),
])
def test_bad_training_input_is_one_line(tmp_path, capsys, args, message):
    assert main(["train", "-o", str(tmp_path / "r"), *TRAIN, *args]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]
    assert not (tmp_path / "r" / "checkpoint.pt").exists()


def test_incompatible_init_names_the_first_mismatching_key(run_dir, tmp_path, capsys):
    args = ["train", "-o", str(tmp_path / "r"), "--steps", "1", *TRAIN, "--width", "0.25", "--init", str(run_dir / "checkpoint.pt")]
    assert main(args) == 1
    assert "is not a compatible checkpoint: '" in capsys.readouterr().err


def test_gradicon_registers_with_a_trained_checkpoint(run_dir):
    yy, xx = torch.meshgrid(torch.arange(40.0), torch.arange(36.0), indexing="ij")
    texture = torch.sin(xx / 3.0) * torch.cos(yy / 4.0) + 0.5 * ((xx - 18) ** 2 + (yy - 20) ** 2 < 80).float()
    fixed = Image(texture, Grid((40, 36), (1.0, 1.5)))
    moving = Image(torch.roll(fixed.data, 2, dims=1), Grid((40, 36), (1.0, 1.5), (3.0, 0.0)))
    result = GradICONMethod(weights=str(run_dir / "checkpoint.pt"), io_iterations=6).register(fixed, moving)
    assert result.field.grid == fixed.grid and result.field.data.shape == (2, 40, 36)
    assert result.info["network_input_size"] == [32, 32] and torch.isfinite(result.field.data).all()
    assert set(result.stage_seconds) == {"load", "instance_optimisation", "network"}
    plain = GradICONMethod(weights=str(run_dir / "checkpoint.pt"), io_iterations=0).register(fixed, moving)
    tuned = GradICONMethod(weights=str(run_dir / "checkpoint.pt"), io_iterations=2, io_space="weights").register(fixed, moving)
    for other in (result, tuned):  # both spaces change the network's answer
        assert float((other.field.data - plain.field.data).abs().max()) > 1e-4


def test_a_2d_model_registers_a_3d_stack_slice_by_slice(run_dir):
    yy, xx = torch.meshgrid(torch.arange(40.0), torch.arange(36.0), indexing="ij")
    texture = torch.sin(xx / 3.0) * torch.cos(yy / 4.0)
    stack = torch.stack([texture * (1 + 0.1 * k) for k in range(3)])
    fixed = Image(stack, Grid((3, 40, 36), (1.0, 1.2, 9.0)))
    moving = Image(torch.roll(stack, 2, dims=2), fixed.grid)
    result = GradICONMethod(weights=str(run_dir / "checkpoint.pt"), io_iterations=1).register(fixed, moving)
    assert result.info["slice_axis"] == 0 and result.field.grid == fixed.grid
    # In-plane maps only: no displacement through the slices.
    assert float(result.field.data[2].abs().max()) < 1e-4


def test_validation_scores_a_labelled_manifest_during_training(tmp_path):
    from fmreg import phantoms
    from fmreg.io.images import write_image

    pair = phantoms.make_pair(2, seed=3)
    for role in ("fixed", "moving", "fixed_labels", "moving_labels"):
        write_image(getattr(pair, role), tmp_path / f"{role}.nii.gz")
    (tmp_path / "val.csv").write_text("name,fixed,moving,fixed_labels,moving_labels,labels\n"
                                      "p,fixed.nii.gz,moving.nii.gz,fixed_labels.nii.gz,moving_labels.nii.gz,1 2\n")
    out = tmp_path / "run"
    assert main(["train", "-o", str(out), "--steps", "2", *TRAIN, "--validate", str(tmp_path / "val.csv"),
                 "--validate-every", "1"]) == 0
    card = json.loads((out / "model.json").read_text())
    assert [v["step"] for v in card["validation"]] == [1, 2]
    assert all(0.0 <= v["dice"] <= 1.0 and v["pairs"] == 1 and v["folding_pct"] >= 0 for v in card["validation"])


def _phantom_manifest(root, ndim):
    from fmreg import phantoms
    from fmreg.io.images import write_image

    pair = phantoms.make_pair(ndim, seed=4)
    for role in ("fixed", "moving"):
        write_image(getattr(pair, role), root / f"{role}{ndim}.nii.gz")
    path = root / f"pairs{ndim}.csv"
    path.write_text(f"name,fixed,moving\np,fixed{ndim}.nii.gz,moving{ndim}.nii.gz\n")
    return path


def test_training_on_manifest_pairs_and_refusing_a_manifest_without_usable_pairs(tmp_path, capsys):
    manifest2d, manifest3d = _phantom_manifest(tmp_path, 2), _phantom_manifest(tmp_path, 3)
    base = ["train", "--size", "32", "32", "--width", "0.125", "--depth", "3", "--batch", "2", "-q", "--steps", "1"]
    assert main([*base, "-o", str(tmp_path / "ok"), "--manifest", str(manifest2d)]) == 0
    card = json.loads((tmp_path / "ok" / "model.json").read_text())
    assert card["data"] == "manifest pairs: pairs2.csv"
    assert main([*base, "-o", str(tmp_path / "bad"), "--manifest", str(manifest3d)]) == 1
    assert "holds no usable 2D pair for training" in capsys.readouterr().err
    assert not (tmp_path / "bad" / "checkpoint.pt").exists()


def test_manifest_pairs_are_augmented_and_shard_like_one_process(tmp_path):
    from fmreg.training.data import ManifestPairs

    manifest = _phantom_manifest(tmp_path, 2)
    one = ManifestPairs([str(manifest)], (32, 32), seed=4)
    shards = [ManifestPairs([str(manifest)], (32, 32), seed=4) for _ in range(2)]
    moving, fixed = one.batch(4)
    parts = [s.batch(2, rank=r, world_size=2) for r, s in enumerate(shards)]
    assert torch.equal(moving, torch.cat([p[0] for p in parts])) and torch.equal(fixed, torch.cat([p[1] for p in parts]))
    # Augmented: no drawn image is one of the stored ones unchanged.
    stored = torch.stack([img for pair in one.images for img in pair])
    for image in torch.cat([moving, fixed]):
        assert (stored - image).abs().flatten(1).max(1).values.min() > 1e-3


def test_training_with_the_mind_ssc_similarity(tmp_path):
    assert main(["train", "-o", str(tmp_path / "r"), "--steps", "1", *TRAIN, "--similarity", "mind-ssc"]) == 0
    card = json.loads((tmp_path / "r" / "model.json").read_text())
    assert card["config"]["similarity"] == "mind-ssc" and card["final_loss"]["similarity"] > 0


def test_a_3d_model_on_2d_images_is_a_one_line_error_with_no_output(tmp_path, capsys):
    run = tmp_path / "r3d"
    assert main(["train", "-o", str(run), "--synthetic", "3d", "--size", "32", "32", "32", "--depth", "3",
                 "--width", "0.1", "--batch", "1", "--steps", "1", "-q"]) == 0
    _phantom_manifest(tmp_path, 2)
    capsys.readouterr()
    out = tmp_path / "o"
    assert main(["register", str(tmp_path / "fixed2.nii.gz"), str(tmp_path / "moving2.nii.gz"), "-o", str(out),
                 "--method", "gradicon", "--param", f"weights={run / 'checkpoint.pt'}", "-q"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is a 3D model; the images are 2D" in err[0]
    assert not out.exists()
