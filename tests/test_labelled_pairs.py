"""Training pairs from labelled images (--labelled): reading, exact geometry, reproducibility, mixing."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from fmreg.cli import main
from fmreg.errors import FmregError
from fmreg.training.data import MixedPairs
from fmreg.training.labelled import LabelledPairs, read_labelled
from fmreg.training.synthetic import SyntheticConfig

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _volume(path, shape=(20, 24, 28)):
    """Three nested boxes: labels 0, 1, 2, 3 with intensities 0, 1, 2, 3 (times 10)."""
    seg = np.zeros(shape)
    seg[2:-2, 2:-2, 2:-2] = 1
    seg[5:-5, 6:-6, 6:-6] = 2
    seg[8:-8, 9:-9, 10:-10] = 3
    np.savez(path, vol=10.0 * seg, seg=seg)
    return path


STILL = dict(deformation_amplitude=0.0, max_rotation=0.0, scale_range=(1.0, 1.0), max_shift=0.0,
             flip_probability=0.0, permute_probability=0.0, bias_strength=0.0, gamma_std=0.0, noise_std=0.0)


def test_read_labelled_scales_intensities_and_names_bad_files(tmp_path):
    image, labels = read_labelled(str(_volume(tmp_path / "v.npz")))
    assert image.shape == labels.shape == (20, 24, 28) and labels.dtype == torch.int64
    assert float(image.min()) == 0.0 and float(image.max()) == 1.0
    torch.testing.assert_close(image, labels.float() / 3.0)
    np.savez(tmp_path / "bad.npz", image=np.zeros((4, 4)))
    with pytest.raises(FmregError, match="no 'vol' and 'seg' arrays"):
        read_labelled(str(tmp_path / "bad.npz"))
    np.savez(tmp_path / "flat.npz", vol=np.ones((4, 4, 4)), seg=np.zeros((4, 4, 4)))
    with pytest.raises(FmregError, match="not constant"):
        read_labelled(str(tmp_path / "flat.npz"))
    with pytest.raises(FmregError, match="cannot read labelled image"):
        read_labelled(str(tmp_path / "missing.npz"))


def test_without_deformation_both_sides_are_the_slice_itself(tmp_path):
    # 2D model: a random slice of the volume, resampled to the input size (here its own size).
    path = str(_volume(tmp_path / "v.npz", shape=(24, 24, 24)))
    source = LabelledPairs([path], SyntheticConfig.default(2, shape=(24, 24), **STILL), seed=3)
    moving, fixed, ml, fl = source.batch(3)
    torch.testing.assert_close(moving, fixed)
    assert torch.equal(ml, fl)
    # The image is the label map scaled to [0, 1] wherever the slice holds labels 0..3.
    for i in range(3):
        present = int(fl[i].max())
        if present:
            torch.testing.assert_close(fixed[i], fl[i].float() / present)


def test_labels_follow_the_deformed_images_and_the_stream_is_reproducible(tmp_path):
    path = str(_volume(tmp_path / "v.npz"))
    config = SyntheticConfig.default(2, shape=(32, 32), deformation_amplitude=3.0, bias_strength=0.0,
                                     gamma_std=0.0, noise_std=0.0)
    a = LabelledPairs([path], config, seed=1)
    first = a.batch(2)
    state = a.state_dict()
    second = a.batch(2)
    b = LabelledPairs([path], config, seed=1)
    for x, y in zip(first, b.batch(2)):
        assert torch.equal(x, y)
    b.load_state_dict(state)
    for x, y in zip(second, b.batch(2)):
        assert torch.equal(x, y)
    moving, _, ml, _ = first
    # Intensity and labels are sampled at the same points (linear vs nearest): away from label
    # edges they agree exactly.
    for i in range(2):
        k = max(int(ml[i].max()), 1)
        agree = (torch.round(moving[i] * k) == ml[i].float()).float().mean()
        assert float(agree) > 0.85


def test_mixed_pairs_split_each_batch_by_share():
    class Counter:
        def __init__(self, tag):
            self.tag = tag

        def batch(self, n, rank=0, world_size=1):
            return (torch.full((n, 1), float(self.tag)), torch.zeros((n, 1)))

        def state_dict(self):
            return {}

    mixed = MixedPairs({"a": (Counter(1), 0.5), "b": (Counter(2), 0.25), "c": (Counter(3), 0.25)})
    moving, _ = mixed.batch(8)
    assert moving.flatten().tolist() == [1.0] * 4 + [2.0] * 2 + [3.0] * 2


def test_train_on_labelled_images_alone_and_with_synthetic_pairs(tmp_path):
    path = str(_volume(tmp_path / "v.npz", shape=(32, 32, 32)))
    base = ["train", "--size", "32", "32", "--steps", "1", "--batch", "2", "-q"]
    assert main([*base, "-o", str(tmp_path / "a"), "--width", "0.1", "--depth", "3", "--labelled", path]) == 0
    card = json.loads((tmp_path / "a" / "model.json").read_text())
    assert card["data"] == "pairs made by deforming v.npz" and card["config"]["labelled_share"] == 1.0
    assert main([*base, "-o", str(tmp_path / "b"), "--model", "mask-guided", "--width", "0.5", "--mask-source", "labels",
                 "--synthetic", "2d", "--labelled", path]) == 0
    card = json.loads((tmp_path / "b" / "model.json").read_text())
    assert card["data"].startswith("50% pairs made by deforming v.npz; 50% synthetic 2D pairs")


def test_the_ground_truth_map_takes_the_fixed_labels_to_the_moving_ones(tmp_path):
    from fmreg.core.sampling import sample_normalized

    path = str(_volume(tmp_path / "v.npz"))
    config = SyntheticConfig.default(2, shape=(32, 32), deformation_amplitude=3.0)
    pair = LabelledPairs([path], config, seed=2).pair(0, truth=True)
    assert pair.fixed_to_moving.shape == (1, 32, 32, 2)
    pulled = sample_normalized(pair.moving_labels.float(), pair.fixed_to_moving, mode="nearest").long()
    inside = (pair.fixed_to_moving.abs() <= 1).all(-1)[:, None]
    agree = (pulled == pair.fixed_labels)[inside].float().mean()
    assert float(agree) > 0.95
