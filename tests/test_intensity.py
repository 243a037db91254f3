"""core.intensity: the one percentile window and the one resize."""

import numpy as np
import torch
from torch.testing import assert_close

from fmreg.core.intensity import normalize, percentile_window, resize


def test_percentile_window_is_linear_between_ranks_and_skips_non_finite():
    x = np.arange(101, dtype=np.float32)  # percentile p is exactly p
    x = np.concatenate([x, [np.nan, np.inf]])
    assert percentile_window(x, 1, 99) == (1.0, 99.0)
    assert percentile_window(torch.from_numpy(x), 10, 90) == (10.0, 90.0)


def test_percentile_window_widens_to_min_max_when_percentiles_coincide():
    x = np.zeros(1000, dtype=np.float32)
    x[0] = 5.0  # one bright voxel on a background: both percentiles are 0
    assert percentile_window(x) == (0.0, 5.0)
    assert percentile_window(np.full(10, 3.0)) == (3.0, 3.0)
    assert percentile_window(np.full(4, np.nan)) == (0.0, 0.0)


def test_percentile_window_subsamples_every_nth_value():
    x = np.arange(1000, dtype=np.float32)
    # every 10th value: 0, 10, ..., 990; ranks 24.75 and 74.25 of those 100
    assert percentile_window(x, 25, 75, max_samples=100) == (247.5, 742.5)
    lo, hi = percentile_window(x, 0, 100, max_samples=100)
    assert (lo, hi) == (0.0, 990.0)


def test_normalize_maps_window_to_unit_range_for_tensors_and_arrays():
    t = torch.linspace(-10, 10, 201)
    out = normalize(t, 0, 100)
    assert_close(out, (t + 10) / 20)
    a = normalize(np.array([1.0, 2.0, 3.0]), 0, 100)
    assert a.dtype == np.float32 and a.tolist() == [0.0, 0.5, 1.0]
    assert torch.all(normalize(torch.full((3, 3), 7.0)) == 0)


def test_resize_keeps_corner_voxels_and_area_averages():
    x = torch.tensor([[[0.0, 1.0, 2.0]]])  # (C=1, 1, 3)
    assert_close(resize(x, (1, 5)), torch.tensor([[[0.0, 0.5, 1.0, 1.5, 2.0]]]))
    y = torch.arange(16.0).reshape(1, 4, 4)
    assert_close(resize(y, (2, 2), mode="area"), torch.tensor([[[2.5, 4.5], [10.5, 12.5]]]))
    assert resize(y, (4, 4)) is y


def test_percentile_window_above_the_minimum_ignores_a_padding_frame():
    values = torch.arange(1.0, 101.0)
    framed = torch.cat([torch.zeros(30), values])  # a frame of 30 zeros around 1..100
    # np.percentile of 1..100: 1 + 0.01·99 and 1 + 0.99·99.
    assert percentile_window(framed, above_minimum=True) == (1.99, 99.01)
    assert percentile_window(framed)[0] == 0.0  # the frame sets the plain window
    assert percentile_window(torch.full((5,), 3.0), above_minimum=True) == (3.0, 3.0)  # constant: as before
    assert_close(normalize(framed, above_minimum=True)[:30], torch.zeros(30))
