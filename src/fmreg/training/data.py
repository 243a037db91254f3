"""Training pairs: the user's manifests, the synthetic generator, or a mix of both.

Manifest pairs are read once, brought to the network's input size over each image's own
extent with uniGradICON's intensity preprocessing (:func:`fmreg.core.intensity.foundation_normalize`),
and drawn at random in both directions; label maps are not used for training.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from fmreg.errors import FmregError
from fmreg.io.manifest import read_manifest
from fmreg.nn.images import network_input
from fmreg.training.config import TrainConfig


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

    def batch(self, n: int, rank: int = 0, world_size: int = 1) -> tuple[Tensor, Tensor]:
        """This process's ``(moving, fixed)``: ``(n, 1, *size)`` images in [0, 1].

        Every process draws the whole global batch and keeps its share, so the draw does not
        depend on the number of processes.
        """
        index = torch.randint(len(self.images), (n * world_size,), generator=self.generator)
        index = index[rank * n:(rank + 1) * n].tolist()
        moving = torch.stack([self.images[i][0] for i in index])
        fixed = torch.stack([self.images[i][1] for i in index])
        return moving, fixed

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])


class MixedPairs:
    """``share`` of each batch from ``synthetic``, the rest from ``manifest``."""

    def __init__(self, synthetic, manifest: ManifestPairs, share: float) -> None:
        self.synthetic, self.manifest, self.share = synthetic, manifest, share

    def batch(self, n: int, rank: int = 0, world_size: int = 1) -> tuple[Tensor, Tensor]:
        k = int(round(n * self.share))
        parts = [src.batch(m, rank, world_size)[:2] for src, m in ((self.synthetic, k), (self.manifest, n - k)) if m > 0]
        return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])

    def state_dict(self) -> dict:
        return {"synthetic": self.synthetic.state_dict(), "manifest": self.manifest.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.synthetic.load_state_dict(state["synthetic"])
        self.manifest.load_state_dict(state["manifest"])


class MaskChannels:
    """Pairs with ``K`` matched ROI mask channels, from a source of pairs with label maps.

    The two label maps of a synthetic pair share one base map, so label ``j`` is the same
    structure in both: mask channel ``k`` of both images holds one label drawn at random among
    those present in the fixed map (an empty channel when there are fewer than ``K``).
    """

    def __init__(self, source, channels: int, seed: int) -> None:
        self.source, self.channels = source, channels
        self.generator = torch.Generator().manual_seed(seed)

    def _masks(self, moving_labels: Tensor, fixed_labels: Tensor) -> tuple[Tensor, Tensor]:
        b = fixed_labels.shape[0]
        shape = fixed_labels.shape[2:]
        mm = torch.zeros((b, self.channels, *shape))
        fm = torch.zeros((b, self.channels, *shape))
        for i in range(b):
            present = torch.unique(fixed_labels[i])
            pick = present[torch.randperm(present.numel(), generator=self.generator)[: self.channels]]
            for k, value in enumerate(pick):
                mm[i, k] = (moving_labels[i, 0] == value).float()
                fm[i, k] = (fixed_labels[i, 0] == value).float()
        return mm, fm

    def batch(self, n: int, rank: int = 0, world_size: int = 1) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """``(moving, fixed, moving_masks, fixed_masks)``: images ``(n, 1, *size)``, masks ``(n, K, *size)``."""
        moving, fixed, moving_labels, fixed_labels = self.source.batch(n, rank, world_size)
        return (moving, fixed, *self._masks(moving_labels, fixed_labels))

    def state_dict(self) -> dict:
        return {"source": self.source.state_dict(), "generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.source.load_state_dict(state["source"])
        self.generator.set_state(state["generator"])


def make_pair_source(config: TrainConfig):
    """The pair source of ``config`` and a one-line description of its data (for the model card)."""
    from fmreg.training.synthetic import SyntheticConfig, SyntheticPairs

    synthetic = None
    if config.synthetic > 0:
        synthetic = SyntheticPairs(SyntheticConfig.default(config.dimension, shape=tuple(config.size)), seed=config.seed)
    if config.model == "mask-guided":
        return MaskChannels(synthetic, config.mask_channels, config.seed + 3), (
            f"synthetic {config.dimension}D pairs with {config.mask_channels} label-map mask channels "
            f"(SynthMorph-style generator, seed {config.seed})")
    if config.synthetic >= 1.0:
        return synthetic, f"synthetic {config.dimension}D pairs (SynthMorph-style generator, seed {config.seed})"
    manifest = ManifestPairs(list(config.manifests), tuple(config.size), config.seed + 2)
    names = ", ".join(Path(m).name for m in config.manifests)
    if synthetic is None:
        return manifest, f"manifest pairs: {names}"
    return MixedPairs(synthetic, manifest, config.synthetic), (
        f"{config.synthetic:.0%} synthetic {config.dimension}D pairs, the rest from {names}")

