"""``mask-guided`` (paper 001): a network that sees the images and matched ROI masks of both.

Masks come from SAMReg's ROI pairs (``segmenter`` classical or sam: pair ``k``, by decreasing
similarity, fills channel ``k`` of both mask inputs, missing pairs are empty channels), or,
for ``mask-guided-labels``, from the label maps (an upper bound that sees the ground truth).
Geometry as for ``gradicon`` (:mod:`fmreg.nn.images`).
"""

from __future__ import annotations

import time
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from fmreg.core.image import Image, check_label_grid, check_pair
from fmreg.core.intensity import resize
from fmreg.correspond.pairs import RoiPair, find_roi_pairs, label_roi_pairs
from fmreg.errors import FmregError
from fmreg.methods.base import RegistrationResult, add_method
from fmreg.methods.gradicon import WEIGHTS_PACKAGE, weights_card
from fmreg.methods.params import declare
from fmreg.nn.images import network_input, physical_field


def load_mask_guided(weights: str | Path, dimension: int):
    """A fresh mask-guided network, its input size, its mask channel count and whether it sees
    masks (False: an images-only model of the ablation) from a checkpoint."""
    from fmreg.training.checkpoint import load_checkpoint, load_trained

    net, config = load_trained(load_checkpoint(weights), str(weights), "mask-guided", dimension)
    if net is None:
        raise FmregError(f"{weights} is not a checkpoint of fmreg train --model mask-guided")
    return net, tuple(config["size"]), config["mask_channels"], config.get("mask_inputs", True)


def mask_channels(masks: list[Tensor], image: Image, size: tuple[int, ...], channels: int) -> Tensor:
    """``(1, K, *size)`` masks in [0, 1] over the image's own extent (empty channels past the last)."""
    out = torch.zeros((channels, *size))
    for k, mask in enumerate(masks[:channels]):
        out[k] = resize(mask.float()[None], size)[0]
    return out[None]


SEGMENTERS = ("classical", "sam", "medsam")


class MaskGuidedMethod:
    """Mask-guided network (paper 001) with SAMReg's matched ROI masks as extra inputs."""

    name = "mask-guided"
    uses_labels = False

    def __init__(self, weights: str | None = None, segmenter: str = "classical", model: str | None = None) -> None:
        if segmenter not in SEGMENTERS:
            raise FmregError(f"unknown segmenter '{segmenter}': choose one of {', '.join(SEGMENTERS)}")
        self.weights, self.segmenter, self.model = weights, segmenter, model

    PARAMS = declare(__init__, {
        "weights": (None, "checkpoint of fmreg train --model mask-guided (null: the model shipped with fmreg)"),
        "segmenter": (SEGMENTERS, "where the ROI masks come from (SAMReg's ROI pairs)"),
        "model": (None, "Segment Anything model folder (sam) or LiteMedSAM weights file (medsam)"),
    })

    def parameters(self) -> dict[str, Any]:
        return {"weights": self.weights or "shipped", "segmenter": self.segmenter}

    def _weights(self, ndim: int) -> Path:
        if self.weights:
            return Path(self.weights)
        path = Path(str(resources.files(WEIGHTS_PACKAGE).joinpath(f"mask_guided_{ndim}d.pt")))
        if not path.is_file():
            raise FmregError(f"fmreg ships no {ndim}D mask-guided model: pass --param weights=PATH")
        return path

    def _pairs(self, fixed: Image, moving: Image, fixed_labels, moving_labels) -> list[RoiPair]:
        from fmreg.methods.samreg import make_backend

        cache: dict = {}
        seg = make_backend(self.segmenter, self.model, "segmenter", cache)
        enc = make_backend(self.segmenter, self.model, "encoder", cache)
        return find_roi_pairs(fixed, moving, seg, enc)

    def register(self, fixed: Image, moving: Image, fixed_labels: Image | None = None,
                 moving_labels: Image | None = None) -> RegistrationResult:
        check_pair(fixed, moving)
        weights = self._weights(fixed.ndim)
        t0 = time.perf_counter()
        net, size, k, sees_masks = load_mask_guided(weights, fixed.ndim)
        pairs = []
        if sees_masks:
            pairs = sorted(self._pairs(fixed, moving, fixed_labels, moving_labels), key=lambda p: -p.similarity)
        t1 = time.perf_counter()
        fm = mask_channels([p.fixed_mask for p in pairs], fixed, size, k)
        mm = mask_channels([p.moving_mask for p in pairs], moving, size, k)
        with torch.no_grad():
            transform = net(network_input(moving, size), network_input(fixed, size), mm, fm)
        field = physical_field(transform, fixed.grid, moving.grid)
        card = weights_card(weights)
        return RegistrationResult(field, self.name, self.parameters(), roi_pairs=pairs[:k],
                                  stage_seconds={"load_and_segment": t1 - t0, "network": time.perf_counter() - t1},
                                  info={"network_input_size": list(size), "mask_channels": k,
                                        **({"model": card} if card else {})})


class MaskGuidedLabelsMethod(MaskGuidedMethod):
    """Mask-guided network with masks from the label maps: an upper bound that sees ground truth."""

    name = "mask-guided-labels"
    uses_labels = True

    def __init__(self, weights: str | None = None) -> None:
        super().__init__(weights)

    PARAMS = declare(__init__, {
        "weights": (None, "checkpoint of fmreg train --model mask-guided (null: the model shipped with fmreg)"),
    })

    def parameters(self) -> dict[str, Any]:
        return {"weights": self.weights or "shipped", "segmenter": "labels"}

    def _pairs(self, fixed: Image, moving: Image, fixed_labels, moving_labels) -> list[RoiPair]:
        if fixed_labels is None or moving_labels is None:
            raise FmregError("mask-guided-labels needs both label maps (--fixed-labels and --moving-labels)")
        check_label_grid(fixed_labels, fixed)
        check_label_grid(moving_labels, moving)
        return label_roi_pairs(fixed_labels, moving_labels)


add_method("mask-guided")(MaskGuidedMethod)
add_method("mask-guided-labels")(MaskGuidedLabelsMethod)
