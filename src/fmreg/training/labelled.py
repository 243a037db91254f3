"""Training pairs from the user's labelled images (e.g. ``../shared/data/brain3d``).

Each pair is one labelled image seen twice: a random slice (2D models) or the whole volume (3D
models) is brought to the network's input size, then each side gets its own smooth random
deformation and small random affine (the synthetic generator's, :mod:`fmreg.training.synthetic`),
its own bias field, gamma and noise (:func:`~fmreg.training.synthetic.corrupt`), and both the
same random flips and axis permutation. The label maps follow the images (nearest neighbour),
so a mask-guided model gets exact masks, and real anatomy rather than random shapes.

Files: NumPy ``.npz`` with arrays ``vol`` (intensities) and ``seg`` (labels), voxelmorph's
format, or ``IMAGE,LABELS`` (two image files fmreg reads, on one grid). Intensities are
min-max scaled per image; voxel spacing is not used (pairs are made in voxel space).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from fmreg.core.sampling import identity_points, sample_normalized
from fmreg.errors import FmregError
from fmreg.training.augment import flip_permute, random_flip_permute
from fmreg.training.synthetic import (
    SyntheticConfig,
    SyntheticPair,
    SyntheticPairs,
    corrupt,
    fixed_to_moving,
    pair_seed,
    random_map,
)

#: Slices are drawn from the middle of each axis (this fraction of it): the outer slices of a
#: head or body volume hold mostly background.
MIDDLE = 0.6


def read_labelled(spec: str) -> tuple[Tensor, Tensor]:
    """``(image, labels)`` of one labelled image: float32 in [0, 1] and int64, same shape.

    Args:
        spec: ``PATH.npz`` (arrays ``vol`` and ``seg``) or ``IMAGE,LABELS``.
    """
    try:
        if spec.endswith(".npz"):
            with np.load(spec) as data:
                if "vol" not in data or "seg" not in data:
                    raise FmregError(f"{spec} has no 'vol' and 'seg' arrays (voxelmorph's format)")
                image, labels = torch.from_numpy(np.asarray(data["vol"], np.float32)), torch.from_numpy(
                    np.rint(np.asarray(data["seg"])).astype(np.int64))
        else:
            from fmreg.core.image import check_label_grid
            from fmreg.io.images import read_image

            paths = spec.split(",")
            if len(paths) != 2:
                raise FmregError(f"labelled image '{spec}': give PATH.npz or IMAGE,LABELS")
            img, lab = read_image(paths[0]), read_image(paths[1], is_label=True)
            check_label_grid(lab, img)
            image, labels = img.data.float(), lab.data.long()
    except (OSError, ValueError) as exc:
        raise FmregError(f"cannot read labelled image {spec}: {str(exc).splitlines()[0]}") from exc
    if image.shape != labels.shape or image.dim() not in (2, 3):
        raise FmregError(f"labelled image {spec}: image {tuple(image.shape)} and labels {tuple(labels.shape)} "
                         "must be one 2D or 3D grid")
    if not torch.isfinite(image).all() or float(image.max() - image.min()) <= 0:
        raise FmregError(f"labelled image {spec}: intensities must be finite and not constant")
    return (image - image.min()) / (image.max() - image.min()), labels


class LabelledPairs(SyntheticPairs):
    """An endless, reproducible stream of pairs made from labelled images (module docstring).

    A :class:`~fmreg.training.synthetic.SyntheticPairs` whose pairs come from the images instead
    of random label maps: the same seeding, ``batch`` interface, process sharding and state.

    Args:
        specs: Labelled images (:func:`read_labelled`).
        config: Grid shape and deformation/intensity parameters (``labels`` unused).
        seed: Seed of the stream.
    """

    def __init__(self, specs: list[str], config: SyntheticConfig, seed: int = 0) -> None:
        super().__init__(config, seed)
        self.specs = list(specs)
        self.images = [read_labelled(spec) for spec in self.specs]
        ndim = len(config.shape)
        for spec, (image, _) in zip(self.specs, self.images):
            if image.dim() < ndim:
                raise FmregError(f"labelled image {spec} is {image.dim()}D; a {ndim}D model needs {ndim}D images")

    def _base(self, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """A random image (and slice, for 2D) at the input size: ``(1, 1, *shape)`` float and int64."""
        image, labels = self.images[int(torch.randint(len(self.images), (1,), generator=generator))]
        if image.dim() > len(self.config.shape):
            axis = int(torch.randint(3, (1,), generator=generator))
            n = image.shape[axis]
            lo = int(n * (1 - MIDDLE) / 2)
            index = lo + int(torch.randint(max(1, n - 2 * lo), (1,), generator=generator))
            image, labels = image.select(axis, index), labels.select(axis, index)
        grid = identity_points(self.config.shape)
        base = sample_normalized(image[None, None], grid)
        return base, sample_normalized(labels[None, None].float(), grid, mode="nearest").long()

    def pair(self, index: int, truth: bool = False) -> SyntheticPair:
        """Pair ``index`` of the stream (does not move the stream)."""
        cfg, shape = self.config, self.config.shape
        generator = torch.Generator().manual_seed(pair_seed(self.seed, index))
        image, labels = self._base(generator)
        maps, sides = [], []
        for _ in range(2):
            maps.append(random_map(shape, generator, cfg))
            warped = corrupt(sample_normalized(image, maps[-1].points, padding="border"), generator, cfg)
            sides.append((warped, sample_normalized(labels.float(), maps[-1].points, mode="nearest").long()))
        perm, flips = random_flip_permute(shape, generator, cfg.flip_probability, cfg.permute_probability)
        (m, ml), (f, fl) = [(flip_permute(x, perm, flips), flip_permute(y, perm, flips)) for x, y in sides]
        return SyntheticPair(m, f, ml, fl, fixed_to_moving(maps[0], maps[1], perm, flips, cfg) if truth else None)

    def state_dict(self) -> dict:
        return {**super().state_dict(), "specs": self.specs}

    def load_state_dict(self, state: dict) -> None:
        if state.get("specs") not in (None, self.specs):
            raise FmregError("the labelled-image state was saved with other images")
        super().load_state_dict(state)


def describe(specs: list[str]) -> str:
    """The files of a run's labelled images, for its model card."""
    return ", ".join(Path(s.split(",")[0]).name for s in specs)
