"""Training pairs: the user's manifests, the synthetic generator, or a mix of both.

Manifest pairs are read once, brought to the network's input size over each image's own
extent with uniGradICON's intensity preprocessing (:func:`fmreg.core.intensity.foundation_normalize`),
drawn at random in both directions and augmented; label maps are not used for training.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from fmreg.errors import FmregError
from fmreg.io.manifest import read_manifest
from fmreg.nn.images import network_input
from fmreg.training.augment import augment
from fmreg.training.config import TrainConfig
from fmreg.training.synthetic import SyntheticConfig


class ManifestPairs:
    """Random pairs (either direction) from manifests, seeded.

    Args:
        manifests: Pair manifest CSV files.
        size: Network input shape, array order.
        seed: Seeds the draw.
        log: Progress lines.
    """

    def __init__(self, manifests: list[str], size: tuple[int, ...], seed: int, log=lambda message: None) -> None:
        self.size = tuple(size)
        self.images: list[tuple[Tensor, Tensor]] = []
        for path in manifests:
            for case in read_manifest(path):
                loaded = case.load(log)
                if loaded.fixed.ndim != len(self.size):
                    continue
                f = network_input(loaded.fixed, self.size, "auto")[0]
                m = network_input(loaded.moving, self.size, "auto")[0]
                self.images += [(m, f), (f, m)]
        if not self.images:
            raise FmregError(f"{', '.join(manifests)} holds no usable {len(self.size)}D pair for training")
        self.generator = torch.Generator().manual_seed(seed)
        self.augmentation = SyntheticConfig.default(len(self.size), shape=self.size)

    def batch(self, n: int, rank: int = 0, world_size: int = 1) -> tuple[Tensor, Tensor]:
        """This process's ``(moving, fixed)``: ``(n, 1, *size)`` images in [0, 1], augmented
        (:func:`~fmreg.training.augment.augment`: a small random affine each, the same flips and
        axis permutation for both).

        Every process draws the whole global batch and keeps its share, so the draw does not
        depend on the number of processes.
        """
        index = torch.randint(len(self.images), (n * world_size,), generator=self.generator).tolist()
        moving = torch.stack([self.images[i][0] for i in index])
        fixed = torch.stack([self.images[i][1] for i in index])
        # The whole global batch is augmented in every process, so the stream stays in step.
        moving, fixed = augment(moving, fixed, self.generator, self.augmentation)
        return moving[rank * n:(rank + 1) * n], fixed[rank * n:(rank + 1) * n]

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])


class MixedPairs:
    """Each batch split among named sources by share: source ``i`` gives
    ``round(n · (s_0 + … + s_i)) − round(n · (s_0 + … + s_{i−1}))`` pairs, in order.

    Sources that all give label maps give them here too; otherwise only the images.
    """

    def __init__(self, parts: dict[str, tuple[object, float]]) -> None:
        self.parts = parts

    def batch(self, n: int, rank: int = 0, world_size: int = 1) -> tuple[Tensor, ...]:
        outs, done, cumulative = [], 0, 0.0
        for source, share in self.parts.values():
            cumulative += share
            count = int(round(n * cumulative)) - done
            done += count
            if count > 0:
                outs.append(source.batch(count, rank, world_size))
        arity = min(len(o) for o in outs)
        return tuple(torch.cat([o[j] for o in outs]) for j in range(arity))

    def state_dict(self) -> dict:
        return {name: source.state_dict() for name, (source, _) in self.parts.items()}

    def load_state_dict(self, state: dict) -> None:
        for name, (source, _) in self.parts.items():
            source.load_state_dict(state[name])


def segmenter_mask_pairs(moving: Tensor, fixed: Tensor, channels: int) -> tuple[Tensor, Tensor]:
    """``K`` matched ROI masks of one pair as registration would give them: SAMReg's classical ROI
    pairs, by decreasing similarity (empty channels past the last pair).

    Args:
        moving, fixed: ``(1, *shape)`` images on one unit-spacing grid.
        channels: ``K``.

    Returns:
        ``(moving_masks, fixed_masks)``, each ``(K, *shape)`` in {0, 1}.
    """
    from fmreg.core.grid import Grid
    from fmreg.core.image import Image
    from fmreg.correspond.pairs import find_roi_pairs
    from fmreg.segment.classical import ClassicalEncoder, ClassicalSegmenter

    shape = tuple(fixed.shape[1:])
    grid = Grid(shape)
    pairs = find_roi_pairs(Image(fixed[0].float(), grid), Image(moving[0].float(), grid),
                           ClassicalSegmenter(), ClassicalEncoder())
    pairs = sorted(pairs, key=lambda p: -p.similarity)[:channels]
    mm, fm = torch.zeros((channels, *shape)), torch.zeros((channels, *shape))
    for k, pair in enumerate(pairs):
        mm[k], fm[k] = pair.moving_mask.float(), pair.fixed_mask.float()
    return mm, fm


class MaskChannels:
    """Pairs with ``K`` matched ROI mask channels, from a source of pairs with label maps.

    With the label maps (exact masks): the two label maps of a synthetic pair share one base
    map, so label ``j`` is the same structure in both; channel ``k`` of both images holds one
    label drawn at random among those present in the fixed map (an empty channel when there are
    fewer than ``K``). With the segmenter (imperfect masks, as the network gets them at
    registration): :func:`segmenter_mask_pairs`. ``segmenter_share`` is the chance that a pair's
    masks come from the segmenter.
    """

    def __init__(self, source, channels: int, seed: int, segmenter_share: float = 0.0) -> None:
        self.source, self.channels, self.segmenter_share = source, channels, segmenter_share
        self.generator = torch.Generator().manual_seed(seed)

    def _label_masks(self, moving_labels: Tensor, fixed_labels: Tensor) -> tuple[Tensor, Tensor]:
        mm = torch.zeros((self.channels, *fixed_labels.shape[1:]))
        fm = torch.zeros_like(mm)
        present = torch.unique(fixed_labels)
        pick = present[torch.randperm(present.numel(), generator=self.generator)[: self.channels]]
        for k, value in enumerate(pick):
            mm[k] = (moving_labels[0] == value).float()
            fm[k] = (fixed_labels[0] == value).float()
        return mm, fm

    def batch(self, n: int, rank: int = 0, world_size: int = 1) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """``(moving, fixed, moving_masks, fixed_masks)``: images ``(n, 1, *size)``, masks ``(n, K, *size)``."""
        moving, fixed, moving_labels, fixed_labels = self.source.batch(n, rank, world_size)
        masks = []
        for i in range(moving.shape[0]):
            # A coin only when both sources are in play, so label-only runs keep their stream.
            share = self.segmenter_share
            from_segmenter = share >= 1 or (share > 0 and float(torch.rand((), generator=self.generator)) < share)
            masks.append(segmenter_mask_pairs(moving[i], fixed[i], self.channels) if from_segmenter
                         else self._label_masks(moving_labels[i], fixed_labels[i]))
        return moving, fixed, torch.stack([m for m, _ in masks]), torch.stack([f for _, f in masks])

    def state_dict(self) -> dict:
        return {"source": self.source.state_dict(), "generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.source.load_state_dict(state["source"])
        self.generator.set_state(state["generator"])


#: Chance that a pair's training masks come from the segmenter, per ``TrainConfig.mask_source``.
SEGMENTER_SHARE = {"labels": 0.0, "segmenter": 1.0, "mixed": 0.5}


def make_pair_source(config: TrainConfig):
    """The pair source of ``config`` and a one-line description of its data (for the model card).

    Shares of a batch: ``labelled_share`` from the labelled images (when given), the rest split
    between the synthetic generator (``synthetic``) and the manifests.
    """
    from fmreg.training.labelled import LabelledPairs, describe
    from fmreg.training.synthetic import SyntheticPairs

    synthetic_config = SyntheticConfig.default(config.dimension, shape=tuple(config.size))
    rest = 1.0 - (config.labelled_share if config.labelled else 0.0)
    parts: dict[str, tuple[object, float]] = {}
    notes: list[tuple[float, str]] = []
    if config.labelled:
        parts["labelled"] = (LabelledPairs(list(config.labelled), synthetic_config, config.seed + 4), 1.0 - rest)
        notes.append((1.0 - rest, f"pairs made by deforming {describe(config.labelled)}"))
    if config.synthetic > 0 and rest > 0:
        parts["synthetic"] = (SyntheticPairs(synthetic_config, seed=config.seed), rest * config.synthetic)
        notes.append((rest * config.synthetic,
                      f"synthetic {config.dimension}D pairs (SynthMorph-style generator, seed {config.seed})"))
    if config.synthetic < 1.0 and rest > 0:
        parts["manifest"] = (ManifestPairs(list(config.manifests), tuple(config.size), config.seed + 2),
                             rest * (1.0 - config.synthetic))
        notes.append((rest * (1.0 - config.synthetic),
                      f"manifest pairs: {', '.join(Path(m).name for m in config.manifests)}"))
    source = next(iter(parts.values()))[0] if len(parts) == 1 else MixedPairs(parts)
    note = notes[0][1] if len(notes) == 1 else "; ".join(f"{share:.0%} {text}" for share, text in notes)
    if config.model == "mask-guided":
        share = SEGMENTER_SHARE[config.mask_source]
        masks = {"labels": "label-map", "segmenter": "classical-segmenter ROI-pair",
                 "mixed": "label-map or (half the pairs) classical-segmenter ROI-pair"}[config.mask_source]
        return MaskChannels(source, config.mask_channels, config.seed + 3, share), (
            f"{note}; {config.mask_channels} {masks} mask channels")
    return source, note
