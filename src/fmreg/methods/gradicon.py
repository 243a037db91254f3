"""``gradicon``: a uniGradICON-style registration network (paper 000), with instance optimisation.

Geometry (:mod:`fmreg.nn.images`): each image reaches the network over its own extent and the
network's map comes back as a physical displacement on the fixed grid, like every method's.
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path
from typing import Any

import torch

from fmreg.core.grid import through_plane_axis
from fmreg.core.image import Image, check_pair
from fmreg.errors import FmregError
from fmreg.losses.gradicon import gradicon_loss
from fmreg.losses.image import GaussianLNCC
from fmreg.methods.base import RegistrationResult, add_method
from fmreg.methods.params import declare
from fmreg.nn.gradicon import GradICON
from fmreg.nn.images import network_input, physical_field, refinement_inputs, slicewise_field, stack_inputs
from fmreg.optimize.instance import IO_PARAMS, instance_optimise, instance_options, refine_on_images

#: Where the models shipped with fmreg live (``gradicon_2d.pt`` / ``gradicon_3d.pt`` + ``.json`` cards).
WEIGHTS_PACKAGE = "fmreg.nn.weights"


def shipped_weights(dimension: int) -> Path:
    """Path of the packaged model for 2D or 3D images (3D stacks take the 2D model, slice by
    slice, while no 3D model ships)."""
    for dim in ((3, 2) if dimension == 3 else (2,)):
        path = Path(str(resources.files(WEIGHTS_PACKAGE).joinpath(f"gradicon_{dim}d.pt")))
        if path.is_file():
            return path
    raise FmregError(f"fmreg ships no {dimension}D gradicon model (docs/benchmarks.md says why): train one with "
                     f"`fmreg train --synthetic {dimension}d` and pass --param weights=RUN/checkpoint.pt")


def load_network(weights: str | Path, dimension: int | None = None) -> tuple[GradICON, tuple[int, ...]]:
    """A fresh network and its input size from a checkpoint of ``fmreg train`` or a uniGradICON file.

    uniGradICON's ``Step_2_final.trch`` (a bare ``regis_net`` state_dict) gets the released
    architecture and its 175³ input size. ``dimension`` None takes the checkpoint's.
    """
    from fmreg.training.checkpoint import load_checkpoint, load_trained, load_weights, model_weights

    loaded = load_checkpoint(weights)
    net, config = load_trained(loaded, str(weights), "gradicon", dimension)
    if net is not None:
        return net, tuple(config["size"])
    dim = 3 if dimension is None else dimension  # the released model is 3D
    net, size = GradICON(dim), (175,) * dim
    load_weights(net.regis_net, model_weights(loaded), str(weights))
    return net.eval(), size


class GradICONMethod:
    """uniGradICON-style GradICON network (paper 000), trained by fmreg, with instance optimisation."""

    name = "gradicon"
    uses_labels = False

    def __init__(self, weights: str | None = None, io_iterations: int = 50, io_space: str = "field",
                 io_lr: float | None = None, io_smoothness: float = 0.1, modality: str = "auto") -> None:
        self.io = instance_options(io_iterations, io_space, io_lr, io_smoothness, weights_lr=2e-5)
        if modality not in ("auto", "ct", "mr"):
            raise FmregError(f"unknown modality '{modality}': choose auto, ct or mr")
        self.weights, self.modality = weights, modality

    PARAMS = declare(__init__, {
        "weights": (None, "network file: a checkpoint of fmreg train or uniGradICON's Step_2_final.trch "
                          "(null: the model shipped with fmreg)"),
        **IO_PARAMS,
        "io_lr": ("> 0", "instance-optimisation Adam step size: the weights' (weights, both) or the map's (field) "
                         "(null: 2e-5 for the weights, 3e-3 for the map)"),
        "modality": (("auto", "ct", "mr"), "intensity preprocessing: CT window [-1000, 1000] HU, or min to 99th percentile"),
    })

    def parameters(self) -> dict[str, Any]:
        return {"weights": self.weights or "shipped", **self.io.parameters(), "modality": self.modality}

    def register(self, fixed: Image, moving: Image, fixed_labels=None, moving_labels=None) -> RegistrationResult:
        import time

        check_pair(fixed, moving)
        weights = Path(self.weights) if self.weights else shipped_weights(fixed.ndim)
        t0 = time.perf_counter()
        # A fresh network for every pair: instance optimisation must not carry over.
        net, size = load_network(weights)
        if len(size) > fixed.ndim:
            raise FmregError(f"{weights} is a {len(size)}D model; the images are {fixed.ndim}D")
        axis = through_plane_axis(fixed.grid) if len(size) < fixed.ndim else None
        if axis is None:
            f, m = network_input(fixed, size, self.modality), network_input(moving, size, self.modality)
        else:
            # A 2D model registers a 3D stack slice by slice, all slices in one batch.
            f, m, positions = stack_inputs(fixed, moving, size, axis, self.modality)
        t1 = time.perf_counter()
        if self.io.tunes_weights:
            similarity = GaussianLNCC(5.0)
            net = instance_optimise(net, lambda n: gradicon_loss(n, m, f, similarity), self.io.iterations,
                                    self.io.weights_lr)
        t2 = time.perf_counter()
        with torch.no_grad():
            transform = net(m, f)
        t3 = time.perf_counter()
        if self.io.refines_map:
            fi, mi = refinement_inputs(fixed, moving, size, axis, self.modality)
            transform = refine_on_images(transform, fi, mi, size, self.io.iterations, self.io.field_lr,
                                         self.io.smoothness)
        t4 = time.perf_counter()
        if axis is None:
            field = physical_field(transform, fixed.grid, moving.grid)
        else:
            field = slicewise_field(transform, fixed.grid, moving.grid, axis, positions)
        card = weights_card(weights)
        info = {"network_input_size": list(size), **({"slice_axis": axis} if axis is not None else {}),
                **({"model": card} if card else {})}
        return RegistrationResult(field, self.name, self.parameters(),
                                  stage_seconds={"load": t1 - t0, "instance_optimisation": t2 - t1 + t4 - t3,
                                                 "network": t3 - t2 + time.perf_counter() - t4}, info=info)


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
