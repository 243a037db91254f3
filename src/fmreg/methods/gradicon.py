"""``gradicon``: a uniGradICON-style registration network (paper 000), with instance optimisation.

Geometry (:mod:`fmreg.nn.images`): each image reaches the network over its own extent and the
network's map comes back as a physical displacement on the fixed grid, like every method's.
"""

from __future__ import annotations

import copy
import json
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from fmreg.core.image import Image, check_pair
from fmreg.errors import FmregError
from fmreg.losses.gradicon import gradicon_loss
from fmreg.losses.image import GaussianLNCC
from fmreg.methods.base import RegistrationResult, add_method
from fmreg.methods.params import declare
from fmreg.nn.gradicon import GradICON
from fmreg.nn.images import network_input, physical_field

#: Where the models shipped with fmreg live (``gradicon_2d.pt`` / ``gradicon_3d.pt`` + ``.json`` cards).
WEIGHTS_PACKAGE = "fmreg.nn.weights"


def shipped_weights(dimension: int) -> Path:
    """Path of the packaged model for 2D or 3D images."""
    path = Path(str(resources.files(WEIGHTS_PACKAGE).joinpath(f"gradicon_{dimension}d.pt")))
    if not path.is_file():
        raise FmregError(f"fmreg ships no {dimension}D gradicon model yet (docs/benchmarks.md says why): train one with "
                         f"`fmreg train --synthetic {dimension}d` and pass --param weights=RUN/checkpoint.pt")
    return path


def load_network(weights: str | Path, dimension: int) -> tuple[GradICON, tuple[int, ...]]:
    """A fresh network and its input size from a checkpoint of ``fmreg train`` or a uniGradICON file.

    uniGradICON's ``Step_2_final.trch`` (a bare ``regis_net`` state_dict) gets the released
    architecture and its 175³ input size.
    """
    from fmreg.training.checkpoint import load_checkpoint, load_trained, load_weights, model_weights

    loaded = load_checkpoint(weights)
    net, config = load_trained(loaded, str(weights), "gradicon", dimension)
    if net is not None:
        return net, tuple(config["size"])
    net, size = GradICON(dimension), (175,) * dimension
    load_weights(net.regis_net, model_weights(loaded), str(weights))
    return net.eval(), size


def instance_optimise(net: GradICON, moving: Tensor, fixed: Tensor, iterations: int, lr: float) -> GradICON:
    """Fine-tune a copy of ``net`` on this one pair (Adam over the weights, the GradICON loss)."""
    net = copy.deepcopy(net)
    optim = torch.optim.Adam(net.parameters(), lr=lr)
    similarity = GaussianLNCC(5.0)
    for _ in range(iterations):
        optim.zero_grad()
        gradicon_loss(net, moving, fixed, similarity).total.backward()
        optim.step()
    return net.eval()


class GradICONMethod:
    """uniGradICON-style GradICON network (paper 000), trained by fmreg, with instance optimisation."""

    name = "gradicon"
    uses_labels = False

    def __init__(self, weights: str | None = None, io_iterations: int = 50, io_lr: float = 2e-5,
                 modality: str = "auto") -> None:
        if io_iterations < 0 or io_lr <= 0:
            raise FmregError("io_iterations must be >= 0 and io_lr > 0")
        if modality not in ("auto", "ct", "mr"):
            raise FmregError(f"unknown modality '{modality}': choose auto, ct or mr")
        self.weights, self.io_iterations, self.io_lr, self.modality = weights, io_iterations, io_lr, modality

    PARAMS = declare(__init__, {
        "weights": (None, "network file: a checkpoint of fmreg train or uniGradICON's Step_2_final.trch "
                          "(null: the model shipped with fmreg)"),
        "io_iterations": (">= 0", "instance-optimisation steps on the pair (0: the network alone)"),
        "io_lr": ("> 0", "instance-optimisation Adam step size over the network weights"),
        "modality": (("auto", "ct", "mr"), "intensity preprocessing: CT window [-1000, 1000] HU, or min to 99th percentile"),
    })

    def parameters(self) -> dict[str, Any]:
        return {"weights": self.weights or "shipped", "io_iterations": self.io_iterations, "io_lr": self.io_lr,
                "modality": self.modality}

    def register(self, fixed: Image, moving: Image, fixed_labels=None, moving_labels=None) -> RegistrationResult:
        import time

        check_pair(fixed, moving)
        weights = Path(self.weights) if self.weights else shipped_weights(fixed.ndim)
        t0 = time.perf_counter()
        # A fresh network for every pair: instance optimisation must not carry over.
        net, size = load_network(weights, fixed.ndim)
        f, m = network_input(fixed, size, self.modality), network_input(moving, size, self.modality)
        t1 = time.perf_counter()
        if self.io_iterations:
            net = instance_optimise(net, m, f, self.io_iterations, self.io_lr)
        t2 = time.perf_counter()
        with torch.no_grad():
            transform = net(m, f)
        field = physical_field(transform, fixed.grid, moving.grid)
        card = weights_card(weights)
        return RegistrationResult(field, self.name, self.parameters(),
                                  stage_seconds={"load": t1 - t0, "instance_optimisation": t2 - t1,
                                                 "network": time.perf_counter() - t2},
                                  info={"network_input_size": list(size), **({"model": card} if card else {})})


def weights_card(weights: Path) -> dict | None:
    """The ``model.json`` beside a weights file (its provenance), if there is one."""
    for candidate in (weights.with_suffix(".json"), weights.parent / "model.json"):
        if candidate.is_file():
            try:
                doc = json.loads(candidate.read_text())
            except (OSError, ValueError):
                return None
            return {k: doc[k] for k in ("data", "steps", "wall_time_s", "optimizer") if k in doc}
    return None


add_method("gradicon")(GradICONMethod)
