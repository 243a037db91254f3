"""``mask-guided`` (paper 001): a network that sees the images and matched ROI masks of both.

Masks come from SAMReg's ROI pairs (``segmenter`` classical, sam or medsam; ``pair_source``
consensus: the pairs that agree with the global move the ROIs agree on, when there is one; pair
``k``, by decreasing similarity, fills channel ``k`` of both mask inputs, missing pairs are empty
channels), or,
for ``mask-guided-labels``, from the label maps (an upper bound that sees the ground truth).
Geometry as for ``gradicon`` (:mod:`fmreg.nn.images`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from fmreg.core.grid import through_plane_axis
from fmreg.core.image import Image, check_label_grid, check_pair
from fmreg.core.intensity import resize
from fmreg.correspond.labels import label_roi_pairs
from fmreg.correspond.pairs import Correspondences, RoiPair, SamRegOptions, find_correspondences
from fmreg.errors import FmregError
from fmreg.losses.mask_guided import MaskGuidedLoss
from fmreg.methods.base import RegistrationResult, add_method
from fmreg.methods.gradicon import WEIGHTS_PACKAGE, weights_card
from fmreg.methods.params import declare
from fmreg.nn.images import network_input, physical_field, refinement_inputs, slicewise_field, stack_inputs
from fmreg.optimize.fit import FitOptions, choose_start
from fmreg.optimize.instance import IO_PARAMS, instance_optimise, instance_options, refine_on_images


@dataclass
class LoadedModel:
    """A fresh mask-guided network and what its training run says about it: input ``size``,
    mask ``channels``, whether it sees masks (False: an images-only model of the ablation) and
    the run's loss weight overrides."""

    net: torch.nn.Module
    size: tuple[int, ...]
    channels: int
    sees_masks: bool
    loss_weights: dict


def load_mask_guided(weights: str | Path, dimension: int | None = None) -> LoadedModel:
    """The mask-guided network of a checkpoint of ``fmreg train --model mask-guided``."""
    from fmreg.training.checkpoint import load_checkpoint, load_trained

    net, config = load_trained(load_checkpoint(weights), str(weights), "mask-guided", dimension)
    if net is None:
        raise FmregError(f"{weights} is not a checkpoint of fmreg train --model mask-guided")
    return LoadedModel(net, tuple(config["size"]), config["mask_channels"], config.get("mask_inputs", True),
                       dict(config.get("loss_weights") or {}))


def mask_channels(masks: list[Tensor], size: tuple[int, ...], channels: int) -> Tensor:
    """``(1, K, *size)`` masks in [0, 1] over their image's own extent (empty channels past the last)."""
    out = torch.zeros((channels, *size))
    for k, mask in enumerate(masks[:channels]):
        out[k] = resize(mask.float()[None], size)[0]
    return out[None]


def slice_mask_channels(pairs: list[RoiPair], axis: int, moving_index: Tensor, size: tuple[int, int],
                        channels: int) -> tuple[Tensor, Tensor]:
    """Per fixed slice, the ``K`` first ROI pairs (in the order given) present on it, as 2D masks.

    A slice pair (``fixed_slice`` set) fills its own slice; a volume pair (label maps) fills
    every fixed slice where its fixed mask is, with the moving mask on the paired moving slice.

    Args:
        pairs: 3D ROI pairs, most similar first.
        axis: The slice axis (array order).
        moving_index: ``(S,)`` moving slice paired with each fixed slice.
        size: The network's 2D input shape.
        channels: ``K``.

    Returns:
        ``(moving_masks, fixed_masks)``, each ``(S, K, *size)`` in [0, 1].
    """
    n = moving_index.numel()
    fm, mm = torch.zeros((n, channels, *size)), torch.zeros((n, channels, *size))
    used = [0] * n
    for pair in pairs:
        if pair.fixed_slice is not None:
            slices = [(pair.fixed_slice, pair.moving_slice)]
        else:
            present = pair.fixed_mask.movedim(axis, 0).flatten(1).any(1)
            slices = [(j, int(moving_index[j])) for j in torch.nonzero(present).flatten().tolist()]
        for j, i in slices:
            if used[j] < channels:
                fm[j, used[j]] = resize(pair.fixed_mask.select(axis, j).float()[None], size)[0]
                mm[j, used[j]] = resize(pair.moving_mask.select(axis, i).float()[None], size)[0]
                used[j] += 1
    return mm, fm


def _consensus_holds(fixed: Image, moving: Image, found: Correspondences) -> bool:
    """Whether the ROI consensus move is to be believed: it is the identity, or the images agree
    with it clearly better than with no move (SAMReg's start rule, against the identity the
    network starts from). A wrong consensus hands the network wrong mask pairs."""
    if found.global_affine is None:
        return True
    return choose_start(fixed, moving, found.global_affine, FitOptions(initialize="identity")).name == "candidate"


SEGMENTERS = ("classical", "sam", "medsam")
PAIR_SOURCES = ("consensus", "matched")

#: The instance-optimisation parameters of both mask-guided methods.
_IO_PARAMS = {
    **IO_PARAMS,
    "io_lr": ("> 0", "instance-optimisation Adam step size: the weights' (weights, both; the whole training "
                     "loss) or the map's (field) (null: 1e-4 for the weights, 3e-3 for the map)"),
}


class MaskGuidedMethod:
    """Mask-guided network (paper 001) with SAMReg's matched ROI masks as extra inputs."""

    name = "mask-guided"
    uses_labels = False

    def __init__(self, weights: str | None = None, segmenter: str = "classical", model: str | None = None,
                 pair_source: str = "consensus", io_iterations: int = 50, io_space: str = "both",
                 io_lr: float | None = None, io_smoothness: float = 0.1) -> None:
        if segmenter not in SEGMENTERS:
            raise FmregError(f"unknown segmenter '{segmenter}': choose one of {', '.join(SEGMENTERS)}")
        if pair_source not in PAIR_SOURCES:
            raise FmregError(f"unknown pair_source '{pair_source}': choose one of {', '.join(PAIR_SOURCES)}")
        self.io = instance_options(io_iterations, io_space, io_lr, io_smoothness, weights_lr=1e-4)
        self.weights, self.segmenter, self.model, self.pair_source = weights, segmenter, model, pair_source

    PARAMS = declare(__init__, {
        "weights": (None, "checkpoint of fmreg train --model mask-guided (null: the model shipped with fmreg)"),
        "segmenter": (SEGMENTERS, "where the ROI masks come from (SAMReg's ROI pairs)"),
        "model": (None, "Segment Anything model folder (sam) or LiteMedSAM weights file (medsam)"),
        "pair_source": (PAIR_SOURCES, "consensus: the ROI pairs that agree with the global move the ROIs agree on "
                                      "when the images confirm it, else those that agree with no move; matched: the "
                                      "prototype matches"),
        **_IO_PARAMS,
    })

    def parameters(self) -> dict[str, Any]:
        return {"weights": self.weights or "shipped", "segmenter": self.segmenter, "pair_source": self.pair_source,
                **self.io.parameters()}

    def _weights(self, ndim: int) -> Path:
        if self.weights:
            return Path(self.weights)
        # 3D stacks take the 2D model, slice by slice, while no 3D model ships.
        for dim in ((3, 2) if ndim == 3 else (2,)):
            path = Path(str(resources.files(WEIGHTS_PACKAGE).joinpath(f"mask_guided_{dim}d.pt")))
            if path.is_file():
                return path
        raise FmregError(f"fmreg ships no {ndim}D mask-guided model: pass --param weights=PATH")

    def _pairs(self, fixed: Image, moving: Image, fixed_labels, moving_labels) -> list[RoiPair]:
        from fmreg.methods.samreg import make_backend

        cache: dict = {}
        seg = make_backend(self.segmenter, self.model, "segmenter", cache)
        enc = make_backend(self.segmenter, self.model, "encoder", cache)
        # Wrong matches mislead the network: pairs that agree with the global move the ROIs
        # found (or, when the images reject that move, with none) are fewer but more often
        # right (docs/benchmarks.md).
        found = find_correspondences(fixed, moving, seg, enc, SamRegOptions(pair_source=self.pair_source),
                                     identity_pairs=self.pair_source == "consensus")
        if self.pair_source == "consensus":
            if found.global_pairs and _consensus_holds(fixed, moving, found):
                return found.global_pairs
            if found.identity_pairs:
                return found.identity_pairs
        return found.local_pairs

    def register(self, fixed: Image, moving: Image, fixed_labels: Image | None = None,
                 moving_labels: Image | None = None) -> RegistrationResult:
        check_pair(fixed, moving)
        weights = self._weights(fixed.ndim)
        t0 = time.perf_counter()
        loaded = load_mask_guided(weights)
        net, size, k = loaded.net, loaded.size, loaded.channels
        if len(size) > fixed.ndim:
            raise FmregError(f"{weights} is a {len(size)}D model; the images are {fixed.ndim}D")
        pairs = []
        if loaded.sees_masks:
            pairs = sorted(self._pairs(fixed, moving, fixed_labels, moving_labels), key=lambda p: -p.similarity)
        t1 = time.perf_counter()
        # A 2D model registers a 3D stack slice by slice, all slices in one batch.
        axis = None if len(size) == fixed.ndim else through_plane_axis(fixed.grid)
        if axis is None:
            f, m = network_input(fixed, size), network_input(moving, size)
            fm = mask_channels([p.fixed_mask for p in pairs], size, k)
            mm = mask_channels([p.moving_mask for p in pairs], size, k)
        else:
            f, m, positions = stack_inputs(fixed, moving, size, axis)
            index = ((positions + 1) / 2 * (moving.grid.shape[axis] - 1)).round().long()
            mm, fm = slice_mask_channels(pairs, axis, index, size, k)
        t2 = time.perf_counter()
        if self.io.tunes_weights:
            loss = MaskGuidedLoss(loaded.loss_weights, mask_inputs=loaded.sees_masks)
            net = instance_optimise(net, lambda n: loss(n, m, f, mm, fm), self.io.iterations, self.io.weights_lr)
        t3 = time.perf_counter()
        with torch.no_grad():
            transform = net(m, f, mm, fm)
        t4 = time.perf_counter()
        if self.io.refines_map:
            fi, mi = refinement_inputs(fixed, moving, size, axis)
            transform = refine_on_images(transform, fi, mi, size, self.io.iterations, self.io.field_lr,
                                         self.io.smoothness)
        t5 = time.perf_counter()
        if axis is None:
            field = physical_field(transform, fixed.grid, moving.grid)
        else:
            field = slicewise_field(transform, fixed.grid, moving.grid, axis, positions)
        card = weights_card(weights)
        info = {"network_input_size": list(size), "mask_channels": k,
                **({"slice_axis": axis} if axis is not None else {}), **({"model": card} if card else {})}
        return RegistrationResult(field, self.name, self.parameters(), roi_pairs=pairs[:k],
                                  stage_seconds={"load_and_segment": t1 - t0, "inputs": t2 - t1,
                                                 "instance_optimisation": t3 - t2 + t5 - t4,
                                                 "network": t4 - t3 + time.perf_counter() - t5},
                                  info=info)


class MaskGuidedLabelsMethod(MaskGuidedMethod):
    """Mask-guided network with masks from the label maps: an upper bound that sees ground truth."""

    name = "mask-guided-labels"
    uses_labels = True

    def __init__(self, weights: str | None = None, io_iterations: int = 50, io_space: str = "both",
                 io_lr: float | None = None, io_smoothness: float = 0.1) -> None:
        super().__init__(weights, io_iterations=io_iterations, io_space=io_space, io_lr=io_lr,
                         io_smoothness=io_smoothness)

    PARAMS = declare(__init__, {
        "weights": (None, "checkpoint of fmreg train --model mask-guided (null: the model shipped with fmreg)"),
        **_IO_PARAMS,
    })

    def parameters(self) -> dict[str, Any]:
        return {"weights": self.weights or "shipped", "segmenter": "labels", **self.io.parameters()}

    def _pairs(self, fixed: Image, moving: Image, fixed_labels, moving_labels) -> list[RoiPair]:
        if fixed_labels is None or moving_labels is None:
            raise FmregError("mask-guided-labels needs both label maps (--fixed-labels and --moving-labels)")
        check_label_grid(fixed_labels, fixed)
        check_label_grid(moving_labels, moving)
        return label_roi_pairs(fixed_labels, moving_labels)


add_method("mask-guided")(MaskGuidedMethod)
add_method("mask-guided-labels")(MaskGuidedLabelsMethod)
