"""The interfaces shared by every segment-everything backend and every prototype encoder.

A *segmenter* turns one 2D slice into candidate ROI masks with scores; an *encoder* turns
one 2D slice into a dense feature map for prototypes (paper 002, Eq. 3-5). Any segmenter
pairs with any encoder.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor


@dataclass
class RoiProposals:
    """Candidate ROIs of one 2D slice.

    Attributes:
        masks: ``(K, H, W)`` bool, one mask per candidate, array order (rows, columns).
        scores: ``(K,)`` float in [0, 1]: the backend's confidence (SAM: predicted IoU).
        stability: ``(K,)`` float in [0, 1]: how little the mask changes when its threshold
            (or scale) moves (SAM's stability score).
    """

    masks: Tensor
    scores: Tensor
    stability: Tensor

    @staticmethod
    def empty(shape: tuple[int, int]) -> "RoiProposals":
        return RoiProposals(
            torch.zeros((0, *shape), dtype=torch.bool), torch.zeros(0), torch.zeros(0)
        )

    def __len__(self) -> int:
        return int(self.masks.shape[0])

    def select(self, keep: Tensor) -> "RoiProposals":
        """Subset by a bool mask or an index tensor over the K candidates."""
        return RoiProposals(self.masks[keep], self.scores[keep], self.stability[keep])


@runtime_checkable
class Segmenter(Protocol):
    """Segment everything in one slice."""

    name: str

    def segment(self, image: Tensor) -> RoiProposals:
        """Args: image: ``(H, W)`` float32 slice, any intensity range. Returns its ROI candidates."""
        ...


@runtime_checkable
class Encoder(Protocol):
    """Dense features for prototype pooling."""

    name: str

    def features(self, image: Tensor) -> Tensor:
        """Args: image: ``(H, W)`` float32 slice. Returns ``(C, H', W')`` float32 features
        covering the same field of view (H', W' may be smaller than H, W)."""
        ...
