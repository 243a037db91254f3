"""The models shipped inside the package: present, documented, never trained on evaluation pairs."""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

import pytest
import torch

from fmreg import phantoms
from fmreg.methods.gradicon import GradICONMethod, shipped_weights

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_the_2d_gradicon_model_and_its_card_ship_with_fmreg():
    weights = shipped_weights(2)
    card = json.loads(weights.with_suffix(".json").read_text())
    assert card["model"] == "gradicon" and card["dimension"] == 2
    # Trained on synthetic pairs and deformed copies of brain3d only: no pair of
    # ../shared/data/pairs.csv was seen, in this run or the ones it continued.
    assert card["config"]["manifests"] == [] and card["config"]["synthetic"] == 1.0
    assert [Path(p).name for p in card["config"]["labelled"]] == ["test_scan.npz"]
    for stage in card["pretraining"]:
        assert stage["data"].startswith("synthetic 2D pairs") and "--manifest" not in stage["command"]
    assert card["total_steps"] == card["steps"] + sum(stage["steps"] for stage in card["pretraining"])
    assert card["steps"] > 0 and card["wall_time_s"] > 0 and card["command"].startswith("fmreg train")
    assert weights.stat().st_size < 10e6  # a few MB


def test_gradicon_registers_the_2d_phantom_with_the_shipped_model():
    pair = phantoms.make_pair(2, seed=0)
    result = GradICONMethod(io_iterations=0).register(pair.fixed, pair.moving)
    assert result.field.grid == pair.fixed.grid and torch.isfinite(result.field.data).all()
    assert result.info["model"]["steps"] > 0  # the card travels with the result


def test_3d_stacks_take_the_2d_model_slice_by_slice_while_no_3d_model_ships():
    folder = Path(str(resources.files("fmreg.nn.weights")))
    if (folder / "gradicon_3d.pt").exists():
        pytest.skip("a 3D model ships now")
    assert shipped_weights(3) == shipped_weights(2)
    pair = phantoms.make_pair(3, seed=0)
    result = GradICONMethod(io_iterations=0).register(pair.fixed, pair.moving)
    assert result.field.grid == pair.fixed.grid and "slice_axis" in result.info


def _mask_guided_shipped() -> Path:
    return Path(str(resources.files("fmreg.nn.weights").joinpath("mask_guided_2d.pt")))


def test_the_2d_mask_guided_model_and_its_card_ship_with_fmreg():
    weights = _mask_guided_shipped()
    card = json.loads(weights.with_suffix(".json").read_text())
    assert card["model"] == "mask-guided" and card["dimension"] == 2
    # Synthetic pairs only: no pair of ../shared/data/pairs.csv was seen.
    assert card["config"]["manifests"] == [] and card["config"]["synthetic"] == 1.0
    assert card["config"]["labelled"] == [] and "--manifest" not in card["command"]
    assert card["config"]["squaring_steps"] == 7  # diffeomorphic levels (docs/benchmarks.md)
    assert card["steps"] > 0 and card["wall_time_s"] > 0 and card["command"].startswith("fmreg train")
    assert weights.stat().st_size < 5e6


def test_mask_guided_registers_the_2d_phantom_with_the_shipped_model_and_no_option():
    from fmreg.methods.mask_guided import MaskGuidedMethod

    pair = phantoms.make_pair(2, seed=0)
    method = MaskGuidedMethod(io_iterations=2)
    result = method.register(pair.fixed, pair.moving)
    assert result.field.grid == pair.fixed.grid and torch.isfinite(result.field.data).all()
    assert result.info["model"]["steps"] > 0 and result.parameters["weights"] == "shipped"
    assert MaskGuidedMethod().io.iterations == 50  # the default registration fine-tunes on the pair
