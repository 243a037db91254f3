"""Checkpoints of a training run: written atomically, loaded with one-line errors.

A checkpoint holds everything a run needs to continue bit for bit: the configuration, the
step, the weights (BatchNorm statistics included), the optimizer state, the random number
generator states (global and the data stream's) and the loss history.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fmreg.errors import FmregError
from fmreg.io.outputs import atomic_path

CHECKPOINT = "checkpoint.pt"


def save_checkpoint(run_dir: Path, state: dict[str, Any]) -> Path:
    """Write ``run_dir/checkpoint.pt`` atomically (a crash leaves the previous one intact)."""
    path = Path(run_dir) / CHECKPOINT
    with atomic_path(path) as tmp:
        torch.save(state, tmp)
    return path


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Read a checkpoint (or a bare ``state_dict``) from a file, or raise a one-line error."""
    path = Path(path)
    if not path.is_file():
        raise FmregError(f"no checkpoint at {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # noqa: BLE001 - any unreadable file is the user's to fix
        raise FmregError(f"cannot read {path} as a torch checkpoint: {str(exc).splitlines()[0]}") from exc


def model_weights(loaded: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The ``regis_net`` weights in a checkpoint of ``fmreg train`` or in uniGradICON's file."""
    if "model" in loaded and isinstance(loaded["model"], dict):
        loaded = loaded["model"]
    prefix = "regis_net."
    if any(k.startswith(prefix) for k in loaded):
        loaded = {k[len(prefix):]: v for k, v in loaded.items() if k.startswith(prefix)}
    return loaded


def load_weights(network: nn.Module, weights: dict[str, torch.Tensor], source: str) -> None:
    """``strict=True`` load of ``regis_net`` weights; the first mismatch is named in one line."""
    own = network.state_dict()
    for key, value in weights.items():
        if key not in own:
            raise FmregError(f"{source} is not a compatible checkpoint: unexpected key '{key}'")
        if tuple(own[key].shape) != tuple(value.shape):
            raise FmregError(f"{source} is not a compatible checkpoint: '{key}' has shape {tuple(value.shape)}, "
                             f"the network expects {tuple(own[key].shape)}")
    missing = [k for k in own if k not in weights]
    if missing:
        raise FmregError(f"{source} is not a compatible checkpoint: missing key '{missing[0]}'")
    network.load_state_dict(weights, strict=True)


def load_trained(loaded: dict[str, Any], source: str, kind: str,
                 dimension: int | None) -> tuple[nn.Module | None, dict[str, Any] | None]:
    """A fresh ``kind`` network with the weights of a checkpoint of ``fmreg train``, in eval mode.

    Global random state is left alone (registration must not reseed the caller's torch).

    Args:
        loaded: The file's content (:func:`load_checkpoint`).
        source: The file's name, for messages.
        kind: The model kind the caller needs (``gradicon`` or ``mask-guided``).
        dimension: Dimensionality the caller needs; None takes the model's.

    Returns:
        The network and the run's configuration (as stored), or ``(None, None)`` for a file that
        is not a checkpoint of ``fmreg train`` (a bare ``state_dict``), for the caller to handle.

    Raises:
        FmregError: Another model kind, another dimensionality, or weights that do not fit.
    """
    from fmreg.training.config import TrainConfig, make_model

    if "config" not in loaded:
        return None, None
    config = TrainConfig.from_dict(loaded["config"])
    if config.model != kind:
        raise FmregError(f"{source} is a {config.model} checkpoint; --method {kind} needs a {kind} one")
    if dimension is not None and config.dimension != dimension:
        raise FmregError(f"{source} is a {config.dimension}D model; the images are {dimension}D")
    net = make_model(config)
    target = net.regis_net if kind == "gradicon" else net
    load_weights(target, model_weights(loaded) if kind == "gradicon" else loaded["model"], source)
    return net.eval(), loaded["config"]
