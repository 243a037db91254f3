"""A handcrafted prototype encoder: dense classical features of one slice.

:class:`ClassicalEncoder` stands in for SAM's image encoder (paper 002, Eq. 3) with
handcrafted features whose masked averages (Eq. 5) compare well under cosine similarity
(Eq. 6); it needs no download. :func:`mind_ssc`, :func:`gaussian_blur` and
:func:`soft_histogram` are plain image operations usable on their own. All maps use the
order (H, W) = (rows, columns); sigmas and distances are in pixels.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from fmreg.core.descriptors import mind_ssc
from fmreg.core.intensity import normalize
from fmreg.errors import FmregError
from fmreg.segment.classical.common import as_slice, check_options

__all__ = [
    "ClassicalEncoder",
    "classical_features",
    "gaussian_blur",
    "mind_ssc",
    "soft_histogram",
]

# Intensity is one-dimensional, so any centred intensity channel can only say "brighter" or
# "darker than the slice mean": every bright ROI would point the same way. Intensities (of
# the pixel and of its surroundings) therefore enter as soft histograms, a non-linear
# embedding in which different intensity levels are near-orthogonal. Each group's weight is
# roughly its share of the cosine similarity (histogram prototypes have norms of 0.3-1, the
# standardised groups RMS ~1 per pixel before weighting). Chosen by matching accuracy on the
# synthetic shapes of the tests and the 2D example pairs.
HIST_BINS = 10
HIST_WEIGHT = 1.0
# Local means at these sigmas (px), each as a soft histogram of CONTEXT_BINS bins: what
# surrounds a region (its neighbours' intensities), at two ranges.
CONTEXT_SIGMAS = (4.0, 12.0)
CONTEXT_BINS = 6
CONTEXT_WEIGHT = 0.7
GRADIENT_SIGMAS = (1.0, 2.0)
GRADIENT_WEIGHT = 0.3
LOCAL_STD_SIGMA = 2.0
LOCAL_STD_WEIGHT = 0.3
MIND_DILATION = 2
MIND_SIGMA = 1.0
MIND_WEIGHT = 0.4
# Coarse position (row, column in [-1, 1]): on the example pairs, intra- and inter-subject,
# it raised the share of correct pairs among the 5 most similar, because left/right twins
# (lungs, kidneys, buttocks) look alike otherwise. Set 0 for images whose anatomy is not
# roughly aligned.
POSITION_WEIGHT = 1.0


def _gaussian_kernel(sigma: float, dtype: torch.dtype) -> Tensor:
    radius = max(1, int(math.ceil(3.0 * sigma)))
    x = torch.arange(-radius, radius + 1, dtype=dtype)
    k = torch.exp(-0.5 * (x / sigma) ** 2)
    return k / k.sum()


def gaussian_blur(x: Tensor, sigma: float) -> Tensor:
    """Separable Gaussian blur of ``(N, C, H, W)`` maps, edges replicated; sigma in pixels."""
    if sigma <= 0:
        return x
    k = _gaussian_kernel(sigma, x.dtype)
    r = k.numel() // 2
    n, c, h, w = x.shape
    y = x.reshape(n * c, 1, h, w)
    y = F.conv2d(F.pad(y, (r, r, 0, 0), mode="replicate"), k.view(1, 1, 1, -1))
    y = F.conv2d(F.pad(y, (0, 0, r, r), mode="replicate"), k.view(1, 1, -1, 1))
    return y.reshape(n, c, h, w)


def _gradient_magnitude(x: Tensor) -> Tensor:
    """Central-difference gradient magnitude of ``(N, 1, H, W)``, per pixel."""
    p = F.pad(x, (1, 1, 1, 1), mode="replicate")
    gy = 0.5 * (p[:, :, 2:, 1:-1] - p[:, :, :-2, 1:-1])
    gx = 0.5 * (p[:, :, 1:-1, 2:] - p[:, :, 1:-1, :-2])
    return torch.sqrt(gy * gy + gx * gx)


def _standardise(ch: Tensor) -> Tensor:
    """Centre each channel of ``(C, H, W)`` on its slice mean, scale it to unit std, and
    squash it softly into (-2, 2) with ``2 tanh(z / 2)``.

    Centring is what makes cosine similarity of masked means discriminative: a region darker
    than the slice average points the opposite way from a brighter one instead of both
    pointing into the positive orthant. Squashing keeps a small, extreme region (z of 5 or
    more) from turning its prototype into that one channel, and keeps the centred groups
    from outweighing the intensity histogram, whose prototypes have norms of at most 1.
    """
    mean = ch.mean(dim=(1, 2), keepdim=True)
    std = ch.std(dim=(1, 2), keepdim=True)
    z = torch.where(std > 1e-6, (ch - mean) / std.clamp_min(1e-6), torch.zeros_like(ch))
    return 2.0 * torch.tanh(0.5 * z)


def soft_histogram(x: Tensor, bins: int, width: float = 0.75) -> Tensor:
    """Soft membership of ``(N, 1, H, W)`` values in [0, 1] to ``bins`` evenly spaced bins.

    Gaussian bumps centred at ``linspace(0, 1, bins)`` with sigma ``width`` times the bin
    spacing, normalised to sum to 1 per pixel. Returns ``(N, bins, H, W)``; the mean over a
    region is its (smoothed) intensity histogram.
    """
    centres = torch.linspace(0.0, 1.0, bins, dtype=x.dtype).view(1, -1, 1, 1)
    sigma = width / (bins - 1)
    bumps = torch.exp(-0.5 * ((x - centres) / sigma) ** 2)
    return bumps / bumps.sum(dim=1, keepdim=True).clamp_min(1e-30)


def classical_features(
    image: Tensor | np.ndarray,
    *,
    stride: int = 1,
    hist_bins: int = HIST_BINS,
    position_weight: float = POSITION_WEIGHT,
) -> Tensor:
    """Handcrafted dense features for ROI prototypes (stand-in for SAM's image encoder).

    Channels, in order (all computed on the slice normalised to [0, 1] by its 1st/99th
    percentiles):

    1. intensity: ``hist_bins`` soft-histogram memberships (:func:`soft_histogram`) of the
       sigma-1 smoothed intensity. A prototype's part here is the ROI's intensity histogram:
       non-negative, and orthogonal between ROIs with disjoint intensity ranges.
    2. context: for each sigma of ``CONTEXT_SIGMAS`` px, ``CONTEXT_BINS`` soft-histogram
       memberships of the Gaussian local mean: the intensities around the ROI.
    3. gradient magnitude at sigmas ``GRADIENT_SIGMAS`` px (edges, texture).
    4. local standard deviation in a Gaussian window of sigma ``LOCAL_STD_SIGMA`` px.
    5. 6 MIND-SSC channels (:func:`mind_ssc`): local self-similarity structure.
    6. 2 coarse position channels (row, column in [-1, 1], centred on the slice) times
       ``position_weight / sqrt(2)``; ``position_weight=0`` leaves them out (position-free).

    Groups 3-5 are centred on the slice mean, scaled and squashed per channel
    (:func:`_standardise`) so that they tell "more/less textured than this slice's average"
    in either direction. Every group except position is divided by the square root of its
    channel count and multiplied by its weight (``*_WEIGHT``), so no group dominates the
    cosine by having many channels.

    Args:
        image: ``(H, W)`` slice, any intensity range.
        stride: the feature grid is ``(ceil(H / stride), ceil(W / stride))`` (area-averaged),
            covering the same field of view.
        hist_bins: number of intensity-histogram channels (>= 2).
        position_weight: weight of the position channels (``POSITION_WEIGHT``); 0 leaves
            them out.

    Returns:
        ``(C, H', W')`` float32 with ``C = hist_bins + 2 * CONTEXT_BINS + 9`` plus 2 position
        channels when ``position_weight > 0`` (33 by default).
    """
    arr = as_slice(image)
    if stride < 1:
        raise FmregError(f"feature stride must be >= 1, got {stride}")
    if hist_bins < 2:
        raise FmregError(f"hist_bins must be >= 2, got {hist_bins}")
    x = torch.from_numpy(normalize(arr))[None, None]
    h, w = arr.shape

    def scaled(ch: Tensor, weight: float) -> Tensor:
        return ch[0] * (weight / math.sqrt(ch.shape[1]))

    def standardised(ch: Tensor, weight: float) -> Tensor:
        return _standardise(ch[0]) * (weight / math.sqrt(ch.shape[1]))

    parts = [scaled(soft_histogram(gaussian_blur(x, 1.0), hist_bins), HIST_WEIGHT)]
    context_weight = CONTEXT_WEIGHT / math.sqrt(len(CONTEXT_SIGMAS))
    for sigma in CONTEXT_SIGMAS:
        parts.append(scaled(soft_histogram(gaussian_blur(x, sigma), CONTEXT_BINS), context_weight))
    grads = torch.cat([_gradient_magnitude(gaussian_blur(x, s)) for s in GRADIENT_SIGMAS], dim=1)
    mean2 = gaussian_blur(x, LOCAL_STD_SIGMA)
    local_std = torch.sqrt((gaussian_blur(x * x, LOCAL_STD_SIGMA) - mean2 * mean2).clamp_min(0))
    parts += [
        standardised(grads, GRADIENT_WEIGHT),
        standardised(local_std, LOCAL_STD_WEIGHT),
        standardised(mind_ssc(x), MIND_WEIGHT),
    ]
    if position_weight > 0:
        rows = torch.linspace(-1.0, 1.0, h).view(h, 1).expand(h, w)
        cols = torch.linspace(-1.0, 1.0, w).view(1, w).expand(h, w)
        parts.append(torch.stack([rows, cols]) * (position_weight / math.sqrt(2.0)))
    feats = torch.cat(parts, dim=0)
    if stride > 1:
        size = (math.ceil(h / stride), math.ceil(w / stride))
        feats = F.interpolate(feats[None], size=size, mode="area")[0]
    return feats.float().contiguous()


class ClassicalEncoder:
    """Encoder ``"classical"``: :func:`classical_features` with fixed keyword options.

    Args:
        **options: keyword arguments of :func:`classical_features` (``stride``,
            ``hist_bins``, ``position_weight``).
    """

    name = "classical"

    def __init__(self, **options) -> None:
        check_options(classical_features, options, "classical encoder")
        self.options = options

    def features(self, image: Tensor) -> Tensor:
        """Args: image: ``(H, W)`` slice. Returns ``(C, H', W')`` float32 features."""
        return classical_features(image, **self.options)
