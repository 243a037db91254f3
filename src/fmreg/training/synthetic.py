"""Synthetic training pairs in the style of SynthMorph (Hoffmann et al., IEEE TMI 2022).

A pair: (1) a base label map, the arg-max of ``J`` smooth noise images each warped by its own
smooth diffeomorphism (:func:`label_logits`); (2) the base seen through two independent maps
``P = φ ∘ A`` (``φ = exp(v)`` after a small random affine ``A``), ``moving = base ∘ P_m`` and
``fixed = base ∘ P_f``. Two maps rather than one keep the pair symmetric: neither image is the
undeformed base, so a network cannot learn that one side is always "straight"; (3) each image
rendered with its *own* random intensity per label, blur, bias, gamma and noise (:func:`render`:
contrast invariance); (4) the same random flips/permutation for both (:func:`flip_permute`),
which keeps them related by a diffeomorphism.

Tensors are batch-first ``(B, C, *shape)`` in array order; points and displacements are in the
``NORMALIZED`` frame of :mod:`fmreg.core.grid` (components ``x, y[, z]``). Lengths are voxels of
the generated grid unless stated. Pair ``k`` of a stream is drawn from its own generator seeded
from ``(seed, k)`` (:class:`SyntheticPairs`).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from fmreg.core.sampling import identity_points, sample_normalized, sample_vectors
from fmreg.errors import FmregError
from fmreg.training.augment import affine_points, flip_permute, flip_permute_points, random_affine, random_flip_permute, uniform
from fmreg.transforms.velocity import resize_vectors, scaling_and_squaring

__all__ = ["RandomMap", "SyntheticConfig", "SyntheticPair", "SyntheticPairs", "corrupt", "fixed_to_moving",
           "integrate_velocity", "label_logits", "labels_at", "pair_seed", "random_deformation",
           "random_label_map", "random_map", "random_velocity", "render", "smooth_noise", "synthesize_pair"]


@dataclass
class SyntheticConfig:
    """Parameters of the synthetic pairs; ranges ``(lo, hi)`` are drawn uniformly per image.

    Attributes:
        shape: Grid shape, array order (2 or 3 axes).
        labels: Range of the number of labels ``J`` of a base map (inclusive; SynthMorph: 26).
        label_smoothness: Feature size of the noise images that are arg-maxed, voxels.
        label_warp_amplitude: RMS of the velocity warping each noise image, voxels.
        label_warp_smoothness: Feature size of that velocity, voxels.
        deformation_amplitude: Largest RMS (per component) of the velocity of each image's
            deformation, voxels; the RMS is drawn from ``[0, deformation_amplitude]``.
        deformation_smoothness: Feature size of that velocity, voxels.
        integration_steps: Scaling-and-squaring steps.
        mean_range: Mean intensity of a label (before the final min-max normalisation).
        std_range: Within-label standard deviation, intensity units of ``mean_range``.
        blur_range: Gaussian blur σ, voxels.
        bias_strength: Largest standard deviation of the log of the multiplicative bias field.
        bias_smoothness: Feature size of the bias field, voxels.
        gamma_std: Standard deviation of ``log γ`` of the gamma applied to the ``[0, 1]`` image.
        noise_std: Largest standard deviation of the additive noise, fraction of ``[0, 1]``.
        flip_probability: Probability of flipping each array axis (same for both images).
        permute_probability: Probability of shuffling the axes of equal length (same for both).
        max_rotation: Largest rotation of the random affine about each axis, degrees.
        scale_range: Scale of the random affine per axis.
        max_shift: Largest shift of the random affine per axis, fraction of the field of view.
    """

    shape: tuple[int, ...] = (128, 128)
    labels: tuple[int, int] = (16, 26)
    label_smoothness: float = 16.0
    label_warp_amplitude: float = 4.0
    label_warp_smoothness: float = 32.0
    deformation_amplitude: float = 3.0
    deformation_smoothness: float = 16.0
    integration_steps: int = 7
    mean_range: tuple[float, float] = (0.0, 1.0)
    std_range: tuple[float, float] = (0.02, 0.1)
    blur_range: tuple[float, float] = (0.0, 1.0)
    bias_strength: float = 0.3
    bias_smoothness: float = 48.0
    gamma_std: float = 0.25
    noise_std: float = 0.05
    flip_probability: float = 0.5
    permute_probability: float = 0.5
    max_rotation: float = 10.0
    scale_range: tuple[float, float] = (0.9, 1.1)
    max_shift: float = 0.05

    def __post_init__(self) -> None:
        self.shape = tuple(int(s) for s in self.shape)
        if len(self.shape) not in (2, 3) or min(self.shape) < 2:
            raise FmregError(f"synthetic shape must have 2 or 3 axes of at least 2 voxels, got {self.shape}")
        self.labels = (int(self.labels[0]), int(self.labels[1]))
        if not 2 <= self.labels[0] <= self.labels[1]:
            raise FmregError(f"synthetic label range must be 2 <= lo <= hi, got {self.labels}")

    @classmethod
    def default(cls, ndim: int, **overrides) -> "SyntheticConfig":
        """Defaults for 2D (128×128) or 3D (64³); lengths are the same in voxels."""
        if ndim not in (2, 3):
            raise FmregError(f"synthetic data is 2D or 3D, got ndim={ndim}")
        overrides.setdefault("shape", (128, 128) if ndim == 2 else (64, 64, 64))
        return cls(**overrides)

    def to_dict(self) -> dict:
        """JSON-ready fields (tuples as lists)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


def _blur(x: Tensor, sigma: float) -> Tensor:
    """Separable Gaussian blur of ``(B, C, *shape)`` with replicated borders (σ in voxels).

    Replicated rather than zero borders: a dark rim, the same in both images, would be a cue
    that has nothing to do with anatomy.
    """
    if sigma <= 0.05:
        return x
    radius = max(1, int(math.ceil(2.5 * sigma)))
    t = torch.arange(-radius, radius + 1, dtype=x.dtype)
    kernel = torch.exp(-0.5 * (t / sigma) ** 2)
    kernel = kernel / kernel.sum()
    ndim, channels = x.dim() - 2, x.shape[1]
    conv = F.conv2d if ndim == 2 else F.conv3d
    for axis in range(ndim):
        pad = [0] * (2 * ndim)
        pad[2 * (ndim - 1 - axis)] = pad[2 * (ndim - 1 - axis) + 1] = radius
        ksize = [1] * ndim
        ksize[axis] = kernel.numel()
        x = conv(F.pad(x, pad, mode="replicate"), kernel.reshape(1, 1, *ksize).expand(channels, 1, *ksize),
                 groups=channels)
    return x


def _resize(x: Tensor, shape: Sequence[int]) -> Tensor:
    if tuple(x.shape[2:]) == tuple(shape):
        return x
    mode = "bilinear" if len(shape) == 2 else "trilinear"
    return F.interpolate(x, size=tuple(shape), mode=mode, align_corners=True)


def _work_shape(shape: Sequence[int], factor: float) -> tuple[int, ...]:
    """A grid over the same field of view with voxels about ``factor`` times larger."""
    factor = max(1.0, factor)
    return tuple(min(n, max(2, math.ceil((n - 1) / factor) + 1)) for n in shape)


def smooth_noise(shape: Sequence[int], scale: float, generator: torch.Generator, batch: int = 1,
                 channels: int = 1) -> Tensor:
    """Smooth Gaussian noise of unit RMS per image and channel: white noise ``scale / 2`` voxels
    apart, blurred by one coarse voxel and upsampled linearly (features about ``scale`` across).

    Args:
        shape: Output grid shape, array order.
        scale: Feature size, voxels of ``shape``.
        generator, batch, channels: Random source; leading sizes of the result.

    Returns:
        ``(batch, channels, *shape)`` float32.
    """
    coarse = _work_shape(shape, scale / 2.0)
    x = torch.randn((batch, channels, *coarse), generator=generator)
    x = _resize(_blur(x, 1.0), shape)
    rms = x.pow(2).flatten(2).mean(-1).sqrt().clamp_min(1e-12)
    return x / rms.reshape(batch, channels, *([1] * len(shape)))


def _voxel_to_normalized(shape: Sequence[int]) -> Tensor:
    """``(ndim,)`` normalized length of one voxel per component ``x, y[, z]``."""
    return torch.tensor([2.0 / max(n - 1, 1) for n in reversed(shape)])


def random_velocity(shape: Sequence[int], amplitude: float, smoothness: float, generator: torch.Generator,
                    batch: int = 1, samples_per_feature: float = 8.0) -> Tensor:
    """A smooth random stationary velocity, on a coarse grid spanning the field of view of ``shape``.

    Args:
        shape: Grid shape the velocity is meant for, array order.
        amplitude: RMS of each component over the grid, voxels of ``shape``.
        smoothness: Feature size, voxels of ``shape``.
        generator, batch: Random source; number of independent velocities.
        samples_per_feature: Grid points per ``smoothness``: 8 keeps the error of
            ``exp(-v) ∘ exp(v)`` within about 0.2 voxel inside the grid.

    Returns:
        ``(batch, *work_shape, ndim)`` velocity in normalized units (components ``x, y[, z]``),
        ``work_shape`` about ``smoothness / samples_per_feature`` voxels apart: integrating there
        is enough for a field that smooth, and much cheaper than on ``shape``.
    """
    factor = max(1.0, smoothness / samples_per_feature)
    work = _work_shape(shape, factor)
    noise = smooth_noise(work, smoothness / factor, generator, batch=batch, channels=len(shape))
    return noise.movedim(1, -1) * (amplitude * _voxel_to_normalized(shape))


def integrate_velocity(velocity: Tensor, shape: Sequence[int], steps: int = 7) -> Tensor:
    """``exp(v)`` by scaling and squaring on the velocity's grid, upsampled to ``shape``.

    Args:
        velocity: ``(B, *work_shape, ndim)`` normalized velocity.
        shape: Output grid shape, array order, same field of view.
        steps: Number of squarings.

    Returns:
        ``(B, *shape, ndim)`` normalized points ``φ(x)`` for every voxel ``x`` of ``shape``.
    """
    u = resize_vectors(scaling_and_squaring(velocity, steps), shape)
    return identity_points(shape, u.dtype) + u


def random_deformation(shape: Sequence[int], amplitude: float, smoothness: float, generator: torch.Generator,
                       batch: int = 1, steps: int = 7) -> Tensor:
    """``(batch, *shape, ndim)`` normalized points ``φ(x)`` of ``φ = exp(v)``, ``v`` from :func:`random_velocity`."""
    return integrate_velocity(random_velocity(shape, amplitude, smoothness, generator, batch), shape, steps)


def label_logits(shape: Sequence[int], n_labels: int, smoothness: float, generator: torch.Generator,
                 warp_amplitude: float = 4.0, warp_smoothness: float = 32.0) -> Tensor:
    """SynthMorph's label-map logits: ``n_labels`` smooth noise images, each warped by its own ``exp(v_j)``.

    Kept on a coarse grid (about ``smoothness / 4`` voxels apart): they are smooth, and sampling
    them once at the final points (:func:`labels_at`) gives smooth boundaries with one
    interpolation.

    Args:
        shape: Grid shape of the label map, array order.
        n_labels, smoothness: Number of labels ``J``; feature size of the noise, voxels.
        generator: Random source.
        warp_amplitude, warp_smoothness: RMS and feature size of each warp's velocity, voxels.

    Returns:
        ``(1, n_labels, *work_shape)`` float32 logits over the field of view of ``shape``.
    """
    factor = max(1.0, smoothness / 4.0)
    work = _work_shape(shape, factor)
    noise = smooth_noise(work, smoothness / factor, generator, batch=n_labels)
    # Only the look of the base map depends on these warps, so a coarse integration will do.
    velocity = random_velocity(shape, warp_amplitude, warp_smoothness, generator, n_labels, samples_per_feature=4.0)
    warped = sample_normalized(noise, integrate_velocity(velocity, work), padding="border")
    return warped.transpose(0, 1)


def labels_at(logits: Tensor, points: Tensor) -> Tensor:
    """``(B, 1, *shape)`` int64 arg-max of ``(1, J, *work)`` logits sampled linearly at ``(B, *shape, ndim)``
    normalized points (the border extended outside the grid)."""
    return sample_normalized(logits, points, padding="border").argmax(dim=1, keepdim=True)


def random_label_map(shape: Sequence[int], n_labels: int, smoothness: float, generator: torch.Generator,
                     warp_amplitude: float = 4.0, warp_smoothness: float = 32.0) -> Tensor:
    """A random label map (:func:`label_logits`): ``(1, 1, *shape)`` int64 in ``0 .. n_labels-1``, no background."""
    logits = label_logits(shape, n_labels, smoothness, generator, warp_amplitude, warp_smoothness)
    return labels_at(logits, identity_points(shape))


def _min_max(x: Tensor) -> Tensor:
    flat = x.flatten(1)
    lo, hi = flat.min(1).values, flat.max(1).values
    view = (-1,) + (1,) * (x.dim() - 1)
    return (x - lo.view(view)) / (hi - lo).clamp_min(1e-8).view(view)


def render(labels: Tensor, generator: torch.Generator, config: SyntheticConfig) -> Tensor:
    """Images from label maps, each with its own random contrast (SynthMorph's generative model).

    Per image: a random mean and standard deviation per label (a Gaussian mixture), Gaussian
    blur, a multiplicative smooth bias field, min-max scaling, a random gamma, additive Gaussian
    noise, and a final min-max scaling.

    Args:
        labels: ``(B, 1, *shape)`` int64 label maps (values ``>= 0``).
        generator, config: Random source; intensity parameters (:class:`SyntheticConfig`).

    Returns:
        ``(B, 1, *shape)`` float32 images in ``[0, 1]``.
    """
    b, shape = labels.shape[0], labels.shape[2:]
    k = int(labels.max()) + 1
    means = uniform(generator, *config.mean_range, b, k)
    stds = uniform(generator, *config.std_range, b, k)
    flat = labels.reshape(b, -1)
    image = means.gather(1, flat) + stds.gather(1, flat) * torch.randn(flat.shape, generator=generator)
    image = image.reshape(b, 1, *shape)
    sigmas = uniform(generator, *config.blur_range, b)
    image = torch.cat([_blur(image[i:i + 1], float(sigmas[i])) for i in range(b)])
    return corrupt(image, generator, config)


def corrupt(image: Tensor, generator: torch.Generator, config: SyntheticConfig) -> Tensor:
    """Acquisition-like corruption of ``(B, 1, *shape)`` images: a multiplicative smooth bias
    field, min-max scaling, a random gamma, additive Gaussian noise, a final min-max scaling.

    Returns:
        ``(B, 1, *shape)`` float32 images in ``[0, 1]``.
    """
    b, shape = image.shape[0], image.shape[2:]
    view = (b, 1) + (1,) * len(shape)
    log_bias = smooth_noise(shape, config.bias_smoothness, generator, batch=b)
    image = _min_max(image * torch.exp(log_bias * uniform(generator, 0.0, config.bias_strength, b).view(view)))
    image = image ** torch.exp(torch.randn(b, generator=generator) * config.gamma_std).view(view)
    noise = torch.randn(image.shape, generator=generator) * uniform(generator, 0.0, config.noise_std, b).view(view)
    return _min_max(image + noise)


@dataclass
class SyntheticPair:
    """One synthetic pair. Attributes:
        moving, fixed: ``(1, 1, *shape)`` float32 images in ``[0, 1]``.
        moving_labels, fixed_labels: ``(1, 1, *shape)`` int64 label maps.
        fixed_to_moving: ``(1, *shape, ndim)`` normalized points ``T(x)`` with
            ``fixed(x) ≈ moving(T(x))`` (the ground truth a network predicts), or ``None``
            when not asked for.
    """

    moving: Tensor
    fixed: Tensor
    moving_labels: Tensor
    fixed_labels: Tensor
    fixed_to_moving: Tensor | None = None


def synthesize_pair(config: SyntheticConfig, generator: torch.Generator, truth: bool = False) -> SyntheticPair:
    """Draw one pair (module docstring) from ``generator``, consumed in a fixed order.

    ``truth`` also computes ``fixed_to_moving`` (one more integration and resampling).
    """
    shape, cfg = config.shape, config
    n_labels = int(torch.randint(cfg.labels[0], cfg.labels[1] + 1, (1,), generator=generator))
    logits = label_logits(shape, n_labels, cfg.label_smoothness, generator,
                          cfg.label_warp_amplitude, cfg.label_warp_smoothness)
    sides = [random_map(shape, generator, cfg) for _ in range(2)]
    labels = labels_at(logits, torch.cat([sides[0].points, sides[1].points]))
    images = render(labels, generator, cfg)
    perm, flips = random_flip_permute(shape, generator, cfg.flip_probability, cfg.permute_probability)
    labels, images = flip_permute(labels, perm, flips), flip_permute(images, perm, flips)
    t = fixed_to_moving(sides[0], sides[1], perm, flips, cfg) if truth else None
    return SyntheticPair(images[0:1], images[1:2], labels[0:1], labels[1:2], t)


@dataclass
class RandomMap:
    """One side of a pair: ``P = φ ∘ A`` with ``φ = exp(v)``. Attributes: ``velocity``
    (:func:`random_velocity`), the affine ``matrix`` and ``offset`` (:func:`random_affine`), and
    ``points``: ``(1, *shape, ndim)`` normalized ``P(x)`` where the base is sampled."""

    velocity: Tensor
    matrix: Tensor
    offset: Tensor
    points: Tensor


def random_map(shape: Sequence[int], generator: torch.Generator, config: SyntheticConfig) -> RandomMap:
    """Draw one side's map (a deformation of random size up to ``deformation_amplitude``, then
    the small random affine), from ``generator`` in a fixed order."""
    amplitude = float(torch.rand(1, generator=generator)) * config.deformation_amplitude
    velocity = random_velocity(shape, amplitude, config.deformation_smoothness, generator)
    matrix, offset = random_affine(shape, generator, config)
    phi_disp = integrate_velocity(velocity, shape, config.integration_steps) - identity_points(shape)
    affine_pts = affine_points(matrix, offset, shape)
    return RandomMap(velocity, matrix, offset, affine_pts + sample_vectors(phi_disp, affine_pts))


def fixed_to_moving(moving: RandomMap, fixed: RandomMap, perm: Sequence[int], flips: Sequence[bool],
                    config: SyntheticConfig) -> Tensor:
    """The ground truth ``T = P_m⁻¹ ∘ P_f`` of a pair (``φ⁻¹ = exp(−v)``), after the pair's flips
    and permutation: ``(1, *shape, ndim)`` normalized points with ``fixed(x) ≈ moving(T(x))``."""
    shape = tuple(fixed.points.shape[1:-1])
    inv_disp = integrate_velocity(-moving.velocity, shape, config.integration_steps) - identity_points(shape)
    z = fixed.points + sample_vectors(inv_disp, fixed.points)
    return flip_permute_points((z - moving.offset) @ torch.linalg.inv(moving.matrix).T, perm, flips)


def pair_seed(seed: int, index: int) -> int:
    """Seed of pair ``index`` of the stream ``seed`` (reproducible, independent of other pairs)."""
    # SeedSequence mixes (seed, index) so that neighbouring streams are unrelated.
    state = np.random.SeedSequence([int(seed), int(index)]).generate_state(2, np.uint32)
    return (int(state[0]) << 31) ^ int(state[1])


class SyntheticPairs:
    """An endless, reproducible stream of synthetic pairs.

    Pair ``k`` of the stream is drawn from its own ``torch.Generator`` seeded from
    ``(seed, k)``. The whole state is therefore ``(seed, next index)``: the same seed gives the
    same stream, :meth:`load_state_dict` resumes it bit for bit, and with ``world_size``
    processes each one draws only its own share of a global batch, which equals the batch a
    single process draws (as DistributedDataParallel's equivalence needs).

    Args:
        config: Parameters (default: :meth:`SyntheticConfig.default` for 2D).
        seed: Seed of the stream.
        batch_size: Batch size of iteration (``iter``).
    """

    def __init__(self, config: SyntheticConfig | None = None, seed: int = 0, batch_size: int = 1) -> None:
        self.config = config or SyntheticConfig()
        self.seed = int(seed)
        self.batch_size = int(batch_size)
        self.index = 0

    def pair(self, index: int, truth: bool = False) -> SyntheticPair:
        """Pair ``index`` of the stream (does not move the stream)."""
        generator = torch.Generator().manual_seed(pair_seed(self.seed, index))
        return synthesize_pair(self.config, generator, truth=truth)

    def batch(self, batch_size: int | None = None, rank: int = 0,
              world_size: int = 1) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """The next batch: this process's ``batch_size`` pairs of a global batch of ``batch_size * world_size``.

        Returns:
            ``(moving, fixed, moving_labels, fixed_labels)``, each ``(batch_size, 1, *shape)``:
            float32 images in ``[0, 1]`` and int64 label maps.
        """
        n = self.batch_size if batch_size is None else int(batch_size)
        if n < 1 or not 0 <= rank < world_size:
            raise FmregError(f"bad synthetic batch request: batch_size={n}, rank={rank}, world_size={world_size}")
        start = self.index + rank * n
        pairs = [self.pair(start + i) for i in range(n)]
        self.index += n * world_size
        return (torch.cat([p.moving for p in pairs]), torch.cat([p.fixed for p in pairs]),
                torch.cat([p.moving_labels for p in pairs]), torch.cat([p.fixed_labels for p in pairs]))

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor, Tensor, Tensor]]:
        while True:
            yield self.batch()

    def state_dict(self) -> dict:
        """``{"seed", "index", "config"}``: everything needed to continue the stream exactly."""
        return {"seed": self.seed, "index": self.index, "config": self.config.to_dict()}

    def load_state_dict(self, state: dict) -> None:
        """Continue the stream saved by :meth:`state_dict` (the configuration must match)."""
        if state.get("config") not in (None, self.config.to_dict()):
            raise FmregError("the synthetic-data state was saved with another configuration")
        self.seed, self.index = int(state["seed"]), int(state["index"])
